"""A few base-model (UNet) training steps for Testing/test_distributed.py, with and without torchrun.

    python Testing/ddp_segmenter_job.py OUT.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 Testing/ddp_segmenter_job.py OUT.json

The main process writes the per-step loss of the whole batch (under torchrun: averaged over the processes).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from refnet.data.phantoms import PhantomConfig, make_phantom  # noqa: E402
from refnet.segmenters import SegmenterConfig, train_segmenter  # noqa: E402

coarse = PhantomConfig.demo(inplane_spacing_mm=(6.0, 6.0), slice_spacing_mm=(9.0, 9.0))
cases = [(ph.ct, ph.labels) for ph in (make_phantom(s, coarse) for s in (1, 2))]
config = SegmenterConfig(architecture="unet", steps=4, batch_size=4, patch_size=(32, 32, 16), features=8, lr=1e-3)
losses = []
train_segmenter(cases, config, device="cpu", on_step=lambda step, loss: losses.append(loss))
if os.environ.get("RANK", "0") == "0":
    Path(sys.argv[1]).write_text(json.dumps(losses))
