// The login page's one behaviour, in a file of its own: the page's policy runs no inline script.
if (new URLSearchParams(location.search).has("wrong")) document.getElementById("wrong").hidden = false;
if (new URLSearchParams(location.search).has("wait")) document.getElementById("wait").hidden = false;
