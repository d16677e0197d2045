"""fractalfs: remote named pipes as ordinary files (the FRACTAL Remote Pipe over FUSE).

The public surface is re-exported here; everything else is internal.
"""

from .codec import SENTINEL as SENTINEL
from .codec import Decoder as Decoder
from .config import DiscoveryConfig as DiscoveryConfig
from .config import NodeConfig as NodeConfig
from .edgeid import EdgeId as EdgeId
from .policy import Mode as Mode
from .policy import decide as decide

__version__ = "0.1.0"
