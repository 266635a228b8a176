import sys, time, torch
from pathlib import Path
from kosmos_serve.engine import Engine, ImageFeatureCache
from kosmos_serve.config import EngineSettings
from kosmos_serve.training.records import read_examples
from kosmos_serve.training.train import TrainingSet, train
from kosmos_serve.training.config import TrainConfig
from kosmos_serve.training import patch_supervision, scratch
from kosmos_serve.training.evaluate import evaluate, format_scores

torch.set_num_threads(int(dict(a.split("=") for a in sys.argv[1:]).get("threads", 2)))
args = dict(a.split("=") for a in sys.argv[1:])
W = int(args.get("width", 128))
scratch.SCRATCH_SIZE = {"text_width": W, "text_layers": int(args.get("tl", 3)), "vision_width": W,
                        "vision_layers": int(args.get("vl", 3)), "patch_size": 28}
patch_supervision.WORDS_WEIGHT = float(args.get("ww", patch_supervision.WORDS_WEIGHT))
model, processor = scratch.build_scratch_model(0)
examples = read_examples(args.get("data", "data/shapes-8k/records.jsonl"))
held = read_examples(args.get("held", "data/shapes-eval/records.jsonl"))
held = [e for e in held if e.kind == "referring"][:120] + [e for e in held if e.kind == "caption"][:60]
config = TrainConfig(steps=int(args.get("steps", 3000)), batch_size=int(args.get("bs", 32)),
                     learning_rate=float(args.get("lr", 2e-3)), warmup_steps=100, checkpoint_every=100000,
                     patch_supervision_weight=float(args.get("aux", 1.0)),
                     location_attention_weight=float(args.get("att", 0.0)))
EVAL = int(args.get("eval", 500)); t0 = time.time(); losses = []

def on_step(step, loss):
    losses.append(loss)
    if step % 50 == 0:
        print(f"step {step} loss {sum(losses[-50:])/50:.3f} {time.time()-t0:.0f}s", flush=True)
    if step % EVAL == 0:
        model.eval()
        eng = Engine.__new__(Engine)
        eng.settings = EngineSettings(model="x", max_batch_size=32); eng.model = model; eng.processor = processor
        eng.device = model.device; eng.dtype = model.dtype; eng.cache = ImageFeatureCache(0)
        eng.pad_token_id = processor.tokenizer.pad_token_id
        with torch.no_grad():
            print("EVAL", step, format_scores(evaluate(eng, held)).replace("\n", " | "), flush=True)
        model.save_pretrained(f"{args.get('out')}-eval{step}"); processor.save_pretrained(f"{args.get('out')}-eval{step}")
        model.train()

train(model, processor, TrainingSet(processor, examples), Path(args.get("out", "/tmp/exp/out")), config, on_step=on_step, progress=False)
