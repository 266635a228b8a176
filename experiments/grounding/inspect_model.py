"""What a trained checkpoint gets right, teacher-forced on held-out captions: each target word and box
corner, and whether its image tokens hold their patch's colour and shape where the lookups read them."""
import collections, sys, torch
from transformers import Kosmos2ForConditionalGeneration, Kosmos2Processor
from kosmos_serve.training.records import read_examples
from kosmos_serve.training.train import TrainingSet
from kosmos_serve.training.patch_supervision import WORD_CODE_SCALE, PatchSupervision
from kosmos_serve.training.shapes import COLOURS, SHAPES
args = dict(a.split("=") for a in sys.argv[2:])
torch.set_num_threads(int(args.get("threads", 2)))
model = Kosmos2ForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
processor = Kosmos2Processor.from_pretrained(sys.argv[1]); tok = processor.tokenizer
held = [e for e in read_examples(args.get("held", "data/shapes-eval/records.jsonl")) if e.kind == "caption"][:60]
batch = TrainingSet(processor, held).batch(list(range(len(held))))
with torch.no_grad():
    out = model(**vars(batch))
first = tok.convert_tokens_to_ids("<patch_index_0000>")
predicted, labels = out.logits[:, :-1].argmax(-1), batch.labels[:, 1:]
right = collections.defaultdict(lambda: [0, 0])
for row in range(len(held)):
    corner = 0
    for position, label in enumerate(labels[row].tolist()):
        if label < 0:
            continue
        guess = predicted[row, position].item()
        if first <= label < first + 1024:  # a box corner: right within one cell
            name, corner = f"corner {corner % 2 + 1}", corner + 1
            ok = abs((guess - first) % 32 - (label - first) % 32) <= 1 and abs((guess - first) // 32 - (label - first) // 32) <= 1
        else:
            name, ok = tok.convert_ids_to_tokens(label), guess == label
        right[name][0] += ok; right[name][1] += 1
print("teacher-forced:", ", ".join(f"{name} {hits}/{total}" for name, (hits, total) in sorted(right.items(), key=lambda item: -item[1][1])))

supervision = PatchSupervision(model, processor, held)
words = supervision.words_of([e.image_path for e in held])
embeddings = model.get_input_embeddings().weight.detach()
read = out.image_embeds @ supervision.word_turn @ supervision.word_rows.T
for group in (COLOURS, SHAPES):
    ids = torch.tensor([tok.convert_tokens_to_ids("▁" + word) for word in group])
    codes = WORD_CODE_SCALE * embeddings[ids] @ supervision.word_rows.T
    truth = words[..., ids]
    in_object = truth.sum(-1) == 1
    nearest = (read @ codes.T - 0.5 * codes.pow(2).sum(-1)).argmax(-1)
    print(f"image tokens holding their object's {'colour' if group is COLOURS else 'shape'}: "
          f"{(nearest == truth.argmax(-1))[in_object].float().mean():.1%} of {in_object.sum().item()} object patches")
