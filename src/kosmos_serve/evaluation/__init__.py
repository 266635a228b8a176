"""The paper's grounding benchmarks, scored with the original Kosmos-2 evaluation's prompts and protocol; detection
over COCO-format ground truth, which measures the boxes' scores (and with a segmenter, their masks); and
Kosmos-2.5's reading of pages (OCR).

    datasets.py         MDETR's RefCOCO/+/g and Flickr30k Entities files -> examples with the original prompts
    flickr_entities.py  the official Flickr30k Entities folder: true boxes and entity types as the original reads them
    metrics.py          IoU, accuracy@0.5 (the first box), recall@k (any of the first k boxes, any true box)
    backends.py         where prompts run: the engine here, or a service's /v1/generate; or no Kosmos-2, the true
                        boxes given to a segmenter (--masks-from-true-boxes)
    runner.py           batches through a backend, predictions JSONL written as they finish, resumable
    report.py           each split's figures beside the paper's
    synthetic.py        MDETR-format files of the synthetic shapes scenes, for the demo model, and their COCO
                        detection file (each scene's phrases and absent ones)
    detection.py        COCO ground truth (+ an ontology) -> one detection request per image; its predictions line
    detection_metrics.py  COCOeval AP/AP50/AR@100 (scores, and every score 1.0), score AUROC, the min_score table;
                        with masks, each object's mask IoU and COCOeval segm
    ocr_pages.py        JSONL ground truth of each image's lines (text, box) -> one ocr request per page; its line
    ocr_metrics.py      a page's CER and WER, its lines matched one to one by box IoU >= 0.5 (P, R, F1), their CER

`kosmos-serve evaluate --benchmark NAME --annotations FILE --images DIR` runs them (README: "Benchmarks";
BENCHMARKS.md: "Scores and the threshold"); `kosmos-serve data pages` writes synthetic pages to read
(`kosmos_serve.training.pages`).
"""
