"""``manage.py dbkeepalive``: see :mod:`.dbkeepalive`."""
