"""Tests that need the real Samba AD DC fixture (winbind NTLM, LDAP, the DCE/RPC backend)."""
