"""A tiny RefNet training run for Testing/test_distributed.py, started with and without torchrun.

    python Testing/ddp_train_job.py OUT_DIR [EPOCHS]
    python -m torch.distributed.run --standalone --nproc_per_node 2 Testing/ddp_train_job.py OUT_DIR [EPOCHS]

Every process writes its final weights to OUT_DIR/rank<R>.pt; the main process also leaves the loss log in
OUT_DIR/work/train_log.jsonl.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

from refnet.train import train_refnet  # noqa: E402

from Testing.test_train import _config, _pair  # noqa: E402

out = Path(sys.argv[1])
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
config = _config(epochs=epochs, steps_per_epoch=4, batch_size=8, val_cases=1, optimizer="rmsprop", lr=3e-3)
model = train_refnet([_pair(s) for s in range(4)], config, work_dir=out / "work", output=out / "refnet.pt")
torch.save(model.net.state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
