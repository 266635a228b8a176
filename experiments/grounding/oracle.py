"""Oracle image tokens: does the decoder learn REC fast when image tokens carry perfect what+where?"""
import sys, time, torch, torch.nn as nn
from transformers import get_linear_schedule_with_warmup
from kosmos_serve.training.records import read_examples
from kosmos_serve.training.train import TrainingSet, example_order
from kosmos_serve.training.patch_supervision import grounded_objects, patch_targets
from kosmos_serve.training import scratch
from kosmos_serve.grounding import iou
args = dict(a.split("=") for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
W = int(args.get("width", 128))
scratch.SCRATCH_SIZE = {"text_width": W, "text_layers": int(args.get("tl", 3)), "vision_width": W, "vision_layers": 1, "patch_size": 28}
# The options below build their own starts (`gather`/`turn`/`sharp` are the prototype of the package's
# scratch.start_with_phrase_lookup), measured on the start as it was before that one: leave it out.
scratch.start_with_phrase_lookup = lambda model: None
model, proc = scratch.build_scratch_model(0)
TIED = float(args.get("tied", 0))  # image tokens also hold TIED x the sum of their words' text embeddings
SHARP = float(args.get("sharp", 0))  # layer 0, head 0: query and key start as SHARP x one shared projection
TURN = float(args.get("turn", 0))  # image tokens hold their words' embeddings turned by a fixed rotation, keys turn them back
image_turn = torch.linalg.qr(torch.randn(W, W))[0]
SHARP_LAYER = int(args.get("sharp_layer", 0))
shared = torch.linalg.qr(torch.randn(W, 32))[0].T  # 32 orthonormal rows
if SHARP:
    with torch.no_grad():
        att0 = model.text_model.model.layers[SHARP_LAYER].self_attn
        att0.q_proj.weight[:32] = SHARP * shared; att0.k_proj.weight[:32] = SHARP * shared @ (image_turn.T if TURN else torch.eye(W))
        att0.q_proj.bias[:32] = 0; att0.k_proj.bias[:32] = 0
GATHER = float(args.get("gather", 0))  # layer 0, head 0: looks at the last few tokens, passes on their shared-space part
if GATHER:
    with torch.no_grad():
        att = model.text_model.model.layers[0].self_attn
        half = W // 2
        for proj_ in (att.q_proj, att.k_proj):
            proj_.weight[:32] = 0; proj_.bias[:32] = 0
        # the sinusoidal positions' 8 highest frequencies, twice: keys as they are, queries turned back by
        # 2 and by 3 tokens, so <object> looks at the two words before </phrase>
        for slot in range(16):
            f = slot % 8; omega = 10000 ** (-f / (half - 1))
            att.k_proj.weight[2 * slot, f] = GATHER; att.k_proj.weight[2 * slot + 1, half + f] = GATHER
            for back in (2, 3):
                c, s_ = torch.cos(torch.tensor(omega * back)), torch.sin(torch.tensor(omega * back))
                att.q_proj.weight[2 * slot, f] += GATHER * c; att.q_proj.weight[2 * slot, half + f] -= GATHER * s_
                att.q_proj.weight[2 * slot + 1, half + f] += GATHER * c; att.q_proj.weight[2 * slot + 1, f] += GATHER * s_
        att.v_proj.weight[:32] = shared; att.v_proj.bias[:32] = 0
        att.out_proj.weight[:, :32] = shared.T
QK_STD = float(args.get("qk_std", 0))  # start the decoder's query and key projections at this std (0: as built)
if QK_STD:
    with torch.no_grad():
        for layer in model.text_model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, QK_STD)
LOCAL = float(args.get("local", 0))
if LOCAL:
    with torch.no_grad():
        att = model.text_model.model.layers[0].self_attn
        half = W // 2
        for proj in (att.q_proj, att.k_proj):
            proj.weight[:32] = 0; proj.bias[:32] = 0
            for i in range(16):
                proj.weight[i, i] = LOCAL; proj.weight[16 + i, half + i] = LOCAL
tok = proc.tokenizer; V = len(tok); first = tok.convert_tokens_to_ids("<patch_index_0000>")
kinds = args.get("kinds", "referring").split(",")
train_ex = [e for e in read_examples(args.get("data", "data/shapes-8k/records.jsonl")) if e.kind in kinds]
held = [e for e in read_examples(args.get("held", "data/shapes-eval/records.jsonl")) if e.kind == "referring"]
all_ex = read_examples(args.get("data", "data/shapes-8k/records.jsonl")) + read_examples(args.get("held", "data/shapes-eval/records.jsonl"))
objs = grounded_objects(all_ex, proc)
ts, hs = TrainingSet(proc, train_ex), TrainingSet(proc, held)
proj = nn.Linear(V + 128 + 64, W)
def image_embeds(paths):
    out = []
    for p in paths:
        words, corners = patch_targets(objs.get(p, []), 8, V)
        c = torch.zeros(64, 128)
        for k in range(4):
            valid = corners[:, k] >= 0
            c[valid.nonzero()[:, 0], k * 32 + corners[valid, k]] = 1
        out.append(torch.cat([words, c, torch.eye(64)], 1))
    features = torch.stack(out)
    tied = features[..., :V] @ model.get_input_embeddings().weight if TIED else 0.0
    if TIED and TURN: tied = tied @ image_turn.T
    return proj(features) + TIED * tied
HOP = float(args.get("hop", 0)); HOP_LAYER = int(args.get("hop_layer", 1))
phrase_open, phrase_close = tok.convert_tokens_to_ids("<phrase>"), tok.convert_tokens_to_ids("</phrase>")
hop_probe = nn.Linear(W, V)
def hop_loss(hidden, batch):
    """At each position that writes a box's first location token, the phrase's words must be readable."""
    rows, targets, cols = [], [], []
    for r in range(batch.labels.shape[0]):
        ids = batch.input_ids[r].tolist(); lab = batch.labels[r]
        loc = ((lab >= first) & (lab < first + 1024)).nonzero().flatten().tolist()
        for t in loc[0::2]:
            closes = [i for i in range(t) if ids[i] == phrase_close]
            if not closes: continue
            c = closes[-1]; o = max(i for i in range(c) if ids[i] == phrase_open)
            target = torch.zeros(V); target[ids[o + 1:c]] = 1
            rows.append(r); cols.append(t - 1); targets.append(target)
    if not rows: return hidden.sum() * 0
    return nn.functional.binary_cross_entropy_with_logits(hop_probe(hidden[rows, cols]), torch.stack(targets)) * 10
if HOP: params_extra = list(hop_probe.parameters())
params = list(model.text_model.parameters()) + list(proj.parameters()) + (list(hop_probe.parameters()) if float(args.get("hop", 0)) else [])
STEPS = int(args.get("steps", 1500)); BS = int(args.get("bs", 32))
opt = torch.optim.AdamW(params, lr=float(args.get("lr", 2e-3)), weight_decay=0.01)
sch = get_linear_schedule_with_warmup(opt, 100, STEPS)
ATT = float(args.get("att", 0))
from kosmos_serve.training.patch_supervision import box_attention_loss
if ATT: model.set_attn_implementation("eager")
GIVEN = float(args.get("given", 0))  # diagnostic: the <object> position's input embedding also holds the phrase's words
object_id = tok.convert_tokens_to_ids("<object>")
def input_embeddings(batch):
    embeds = model.get_input_embeddings()(batch.input_ids)
    if not GIVEN:
        return embeds
    extra = torch.zeros_like(embeds)
    for r in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[r].tolist()
        if object_id in ids and phrase_close in ids:
            t, c = ids.index(object_id), ids.index(phrase_close); o = ids.index(phrase_open)
            extra[r, t] = GIVEN * model.get_input_embeddings()(batch.input_ids[r, o + 1:c]).sum(0)
    return embeds + extra
def run(batch, paths):
    return model(output_hidden_states=bool(HOP) and model.training, output_attentions=bool(ATT) and model.training, inputs_embeds=input_embeddings(batch), input_ids=None, attention_mask=batch.attention_mask, image_embeds=image_embeds(paths),
                 image_embeds_position_mask=batch.image_embeds_position_mask, labels=batch.labels)
def held_out_corners():
    """(example index, predicted (upper-left, lower-right) cells, true ones) for 160 held-out expressions, teacher-forced."""
    model.eval()
    with torch.no_grad():
        for s in range(0, 160, 40):
            idx = list(range(s, s + 40)); b = hs.batch(idx)
            out = run(b, [hs.examples[i].image_path for i in idx])
            pred = out.logits[:, :-1].argmax(-1); lab = b.labels[:, 1:]
            for r in range(len(idx)):
                pos = ((lab[r] >= first) & (lab[r] < first + 1024)).nonzero().flatten().tolist()
                yield (s + r, (pred[r, pos[0]].item() - first, pred[r, pos[1]].item() - first),
                       (lab[r, pos[0]].item() - first, lab[r, pos[1]].item() - first))
    model.train()
def evaluate():
    def box(tl, br): return ((tl % 32) / 32, (tl // 32) / 32, (br % 32 + 1) / 32, (br // 32 + 1) / 32)
    scores = [iou(box(*predicted), box(*true)) >= 0.5 for _, predicted, true in held_out_corners()]
    return sum(scores) / len(scores)
model.train(); t0 = time.time(); L = []
for step in range(1, STEPS + 1):
    order = example_order(len(ts), 0, (step - 1) * BS, BS)
    out = run(ts.batch(order), [ts.examples[i].image_path for i in order])
    loss = out.loss
    if HOP:
        loss = loss + HOP * hop_loss(out.hidden_states[HOP_LAYER], ts.batch(order))
    if ATT:
        corners = torch.stack([patch_targets(objs.get(ts.examples[i].image_path, []), 8, V)[1] for i in order])
        b = ts.batch(order)
        loss = loss + ATT * box_attention_loss(out.attentions[SHARP_LAYER if SHARP else -1][:, 0], {"labels": b.labels, "image_embeds_position_mask": b.image_embeds_position_mask}, corners, first)
    loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step(); opt.zero_grad()
    L.append(out.loss.item())
    if step % 250 == 0:
        print(step, f"loss {sum(L[-250:])/250:.3f}", f"REC(tf) {evaluate():.1%}", f"{time.time()-t0:.0f}s", flush=True)

# error analysis: which object's corner is each predicted corner near (within one cell)?
import collections
cats = collections.Counter()
def cell(c): return (c % 32, c // 32)
def near(a, b): return abs(a[0] - b[0]) <= 1 and abs(a[1] - b[1]) <= 1
for index, (ptl, pbr), (ttl, tbr) in held_out_corners():
    _, corners = patch_targets(objs[hs.examples[index].image_path], 8, V)
    boxes = {tuple(c) for c in corners.tolist() if c[0] >= 0}
    true = (*cell(ttl), *cell(tbr))
    if near(cell(ptl), true[:2]): k = "TL right"
    elif any(near(cell(ptl), bx[:2]) for bx in boxes): k = "TL of another object"
    else: k = "TL near no object"
    cats[k + (" / BR right" if near(cell(pbr), true[2:]) else " / BR wrong")] += 1
print(dict(cats))
