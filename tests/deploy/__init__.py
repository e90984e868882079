"""The product as deployed: serve processes, HAProxy, container, systemd, packaging, the admin
commands and the bench CLI (the Samba DC where a deployment needs it)."""
