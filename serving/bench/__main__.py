import sys

from serving.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
