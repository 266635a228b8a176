"""Vision alone: how fast does the patch-supervised encoder learn each patch's object box, colour and shape?"""
import sys, time, torch
from transformers import get_linear_schedule_with_warmup
from kosmos_serve.training.records import read_examples
from kosmos_serve.training.train import TrainingSet, example_order
from kosmos_serve.training import patch_supervision, scratch
from kosmos_serve.training.shapes import COLOURS, SHAPES
args = dict(a.split("=") for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
W = 128
scratch.SCRATCH_SIZE = {"text_width": W, "text_layers": 2, "vision_width": W, "vision_layers": int(args.get("vl", 3)), "patch_size": 28}
patch_supervision.WORDS_WEIGHT = float(args.get("ww", patch_supervision.WORDS_WEIGHT))
model, proc = scratch.build_scratch_model(0)
train_ex = [e for e in read_examples(args.get("data", "data/shapes-8k/records.jsonl")) if e.kind == "caption"]
held = [e for e in read_examples(args.get("held", "data/shapes-eval/records.jsonl")) if e.kind == "caption"][:64]
sup = patch_supervision.PatchSupervision(model, proc, train_ex + held)
ts, hs = TrainingSet(proc, train_ex), TrainingSet(proc, held)
params = list(model.vision_model.parameters()) + list(sup.parameters())
STEPS = int(args.get("steps", 1500)); BS = 32
opt = torch.optim.AdamW(params, lr=float(args.get("lr", 2e-3)), weight_decay=0.01)
sch = get_linear_schedule_with_warmup(opt, 100, STEPS)
groups = {name: torch.tensor([proc.tokenizer.convert_tokens_to_ids("▁" + word) for word in words])
          for name, words in (("colour", COLOURS), ("shape", SHAPES))}
held_pixels, held_paths = hs.batch(list(range(len(held)))).pixel_values, [e.image_path for e in held]
def feats(pv):
    return model.vision_model(pixel_values=pv).last_hidden_state
def evaluate():
    model.eval()
    with torch.no_grad():
        f = model.vision_model.model.post_layernorm(feats(held_pixels)[:, 1:])
        words, corners = sup.words_of(held_paths), sup.corners_of(held_paths)
        pred = sup.corners(f).view(len(held_paths), 64, 4, 32).argmax(-1)
        valid = corners >= 0
        out = [f"corner exact {(pred == corners)[valid].float().mean().item():.1%}",
               f"within1 {((pred - corners).abs() <= 1)[valid].float().mean().item():.1%}"]
        logits = sup.words(f)
        for name, ids in groups.items():  # of the patches in an object: is its colour (shape) the likeliest?
            truth = words[..., ids]
            in_object = truth.sum(-1) == 1
            out.append(f"{name} {(logits[..., ids].argmax(-1) == truth.argmax(-1))[in_object].float().mean().item():.1%}")
    model.train(); return " ".join(out)
model.train(); t0 = time.time(); L = []
for step in range(1, STEPS + 1):
    order = example_order(len(ts), 0, (step - 1) * BS, BS)
    b = ts.batch(order)
    loss = sup.loss(model, feats(b.pixel_values), [ts.examples[i].image_path for i in order])
    loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step(); opt.zero_grad()
    L.append(loss.item())
    if step % 250 == 0:
        print(step, f"loss {sum(L[-250:])/250:.3f}", evaluate(), f"{time.time()-t0:.0f}s", flush=True)
