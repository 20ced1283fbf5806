"""The isa4d CLI whose N-th distributed checkpoint write stalls after the shards are written (before meta.pt and
before publication), so a test can kill -9 the run in the middle of a save. Env: ISA4D_STALL_SAVE=N,
ISA4D_STALL_MARKER=path (each rank touches path.<rank> when it stalls)."""

import os
import sys
import time

import torch.distributed.checkpoint as dcp

_save, _calls = dcp.save, [0]


def _stalling_save(*args, **kwargs):
    _calls[0] += 1
    out = _save(*args, **kwargs)
    if _calls[0] == int(os.environ["ISA4D_STALL_SAVE"]):
        open(f"{os.environ['ISA4D_STALL_MARKER']}.{os.environ.get('LOCAL_RANK', '0')}", "w").close()
        time.sleep(600)
    return out


dcp.save = _stalling_save

if __name__ == "__main__":
    from isa4d.cli import main

    sys.exit(main())
