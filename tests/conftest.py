import sys
from pathlib import Path

# Test helpers (hub_cache, ...) are imported as top-level modules, whatever the import mode.
sys.path.insert(0, str(Path(__file__).parent))
