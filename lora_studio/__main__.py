import sys

from lora_studio.cli import main

sys.exit(main())
