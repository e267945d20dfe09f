from gigadiff.entry import main

main()
