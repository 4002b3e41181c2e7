"""``python -m bnfold_gpu``: the ``bnfold`` command line, for an environment whose scripts folder is
not on the PATH."""
import sys

from .cli import command

if __name__ == "__main__":
    sys.exit(command())
