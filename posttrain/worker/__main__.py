import sys

from posttrain.worker.entry import main

sys.exit(main())
