"""Django looks for ``manage.py dbkeepalive`` in :mod:`.commands`."""
