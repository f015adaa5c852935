"""``python -m ncsweep``: see README.md."""

from ncsweep.app import main

if __name__ == "__main__":
    main()
