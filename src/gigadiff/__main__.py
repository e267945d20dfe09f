from gigadiff.cli import main

main()
