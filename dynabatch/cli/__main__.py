import sys
from dynabatch.cli import main
sys.exit(main())
