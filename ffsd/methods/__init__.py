"""Online-distillation methods the engine can drive; each is a ``conf/distill/*.yaml`` option."""

from ffsd.methods.ffsd import FFSD, FFSDNetworks

__all__ = ["FFSD", "FFSDNetworks"]
