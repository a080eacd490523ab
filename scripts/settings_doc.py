"""Print docs/settings.md, the table of every user setting, from their declarations in transferlab/config.py.

    python scripts/settings_doc.py > docs/settings.md

tests/test_settings.py fails when the committed file is not what this prints.
"""

from transferlab.config import settings_doc

if __name__ == "__main__":
    print(settings_doc(), end="")
