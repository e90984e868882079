"""Autodiscover for Outlook ([MS-OXDSCLI] POX), answered by the proxy itself.

* ``pox``       - parsing requests and rendering responses (sans-IO, pure)
* ``settings``  - the ``[autodiscover]`` configuration table and its derived defaults
* ``directory`` - finding the owner of an address in Samba's directory (LDAP, ldap3)
* ``service``   - the aiohttp handler, the port-80 redirect listener
"""
