"""Rendering cost of the 2D-map condition (normal maps) against one tiny CPU training step of the maps variant
(configs/dit/tiny.yaml widths, 2 toy clips at 64x64x13). Run from the repository root: python bench/bench_body_maps.py"""
import sys, time, tempfile, pathlib, statistics
import torch, yaml
sys.path[:0] = ["src", "tests", "."]
from conftest import toy_world_batch
from data_prep.make_toy_body import write_toy_body
from isa4d.models.dit import ISADiT
from isa4d.models.vae import CausalVideoVAE
from isa4d.training.dit_module import DiTModule

body = pathlib.Path(tempfile.mkdtemp()); write_toy_body(body)
vae_args = yaml.safe_load(open("configs/vae/tiny.yaml"))["model"]["init_args"]["vae"]["init_args"]
net_args = yaml.safe_load(open("configs/dit/tiny.yaml"))["model"]["init_args"]["network"]["init_args"]
torch.manual_seed(0)
module = DiTModule(ISADiT(**net_args, pose="maps"), vae=CausalVideoVAE(**vae_args), body_model_dir=str(body)).train()
batch = toy_world_batch("train", 64, 64, 13, 2)
print("clips", len(batch), "people", batch.person_mask.sum().item(), "threads", torch.get_num_threads())
step, render = [], []
for i in range(6):
    t0 = time.perf_counter()
    loss = module.training_step(batch, 0); loss.backward()
    t1 = time.perf_counter()
    module.conditioner.normal_maps(batch.K, batch.w2c, batch.smpl, batch.person_mask, 64, 64, batch.gender)
    t2 = time.perf_counter()
    if i: step.append(t1 - t0); render.append(t2 - t1)
s, r = statistics.median(step), statistics.median(render)
print(f"step (encode+loss+backward, incl. rendering) {s*1e3:.0f} ms, rendering {r*1e3:.0f} ms = {100*r/s:.1f}%")
