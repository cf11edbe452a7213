import sys

from qlora_dist.cli import main

sys.exit(main())
