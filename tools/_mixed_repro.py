"""Temporary: stress the engine's mixed steps on CUDA (1B shape) to find a device assert."""
import random, sys, time, traceback
import torch
from dynabatch.worker_svc.engine import SequenceRequest, build_engine
variant = sys.argv[1]
kw = dict(device="cuda", num_kv_blocks=1024, max_running=256, mixed_steps=True)
if variant == "nographs":
    kw["prefill_graphs"] = False
if variant == "nocompile":
    kw.update(compile_prefill=False, compile_decode=False)
e = build_engine(sys.argv[2] if len(sys.argv) > 2 else "llama-3.2-1b-shape", **kw)
rng = random.Random(0)
n = step = 0
t0 = time.time()
log = []
try:
    while step < 3000 and time.time() - t0 < 45:
        if rng.random() < 0.05:
            L = rng.choice([rng.randint(20, 400), rng.randint(1000, 4100)])
            e.add(SequenceRequest(f"r{n}", [rng.randrange(1000) for _ in range(L)], rng.randint(2, 200), ignore_eos=True)); n += 1
        if step == 100:
            e.set_step_prefill_tokens(80)
        if step > 100 and rng.random() < 0.02:
            e.set_step_prefill_tokens(rng.choice([64, 72, 80, 95, 120]))
        e.step(); step += 1
        r = e.last_step
        log.append((r.kind, r.tokens) if r else None)
    while e.has_work() and step < 6000:
        e.step(); step += 1
    torch.cuda.synchronize()
    print(variant, "OK", n, "requests", step, "steps", e.stats())
except Exception:
    traceback.print_exc()
    print(variant, "FAILED at step", step, "last steps", log[-5:])
