#!/usr/bin/env python
"""``python testproject/manage.py ...`` from anywhere: imports the project as ``testproject``."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Replace the script's own directory (Python puts it first) by the repository root,
# so the app is only ever imported as testproject.testapp, never as plain testapp.
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.pop(0)
sys.path.insert(0, str(HERE.parent))

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
