"""The readers on small files written here in exactly MDETR's format (the real ones cannot be downloaded here).

The field names and value types are those MDETR's own scripts write: `scripts/fine-tuning/refexp_coco_format.py`
(RefCOCO/+/g: integer sizes, float COCO boxes) and `scripts/pre-training/flickr_combined.py` (Flickr30k: sizes as
strings, read from the XML; spans as [[start, end]] lists; separate ground truth, one annotation per box).
"""

import json
from pathlib import Path

import pytest

from kosmos_serve.errors import InvalidRequestError
from kosmos_serve.evaluation.datasets import (
    AnnotationFormatError,
    find_image,
    read_flickr,
    read_refexp,
    read_splits,
    sample,
    split_name,
)
from kosmos_serve.evaluation.flickr_entities import FlickrEntities, parse_boxes

REFEXP = {
    "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset."}, "licenses": [],
    "images": [
        {"file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427, "id": 0, "original_id": 581857,
         "caption": "the lady with the blue shirt", "dataset_name": "refcoco", "tokens_negative": [[0, 8]]},
        {"file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427, "id": 1, "original_id": 581857,
         "caption": "lady in back", "dataset_name": "refcoco", "tokens_negative": [[0, 4]]},
        {"file_name": "COCO_val2014_000000000042.jpg", "height": 480, "width": 640, "id": 2, "original_id": 42,
         "caption": "dog on left", "dataset_name": "refcoco", "tokens_negative": [[0, 3]]},
    ],
    "annotations": [
        {"area": 15085.36, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
         "bbox": [103.93, 299.99, 134.22, 177.42], "original_id": 1719310, "tokens_positive": [[4, 8]]},
        {"area": 9000.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 1, "bbox": [0, 10, 90, 100],
         "original_id": 1719311, "tokens_positive": [[0, 4]]},
        {"area": 5000.0, "iscrowd": 0, "image_id": 2, "category_id": 18, "id": 2, "bbox": [5, 6, 50, 100],
         "original_id": 1719312, "tokens_positive": [[0, 3]]},
    ],
    "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
}
CAPTION = "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
FLICKR = {
    "info": [], "licenses": [],
    "images": [{
        "file_name": "1000092795.jpg", "height": "333", "width": "500", "id": 0, "caption": CAPTION,
        "dataset_name": "flickr", "tokens_negative": [[0, len(CAPTION)]], "sentence_id": 0,
        "original_img_id": 1000092795, "tokens_positive_eval": [[[0, 14]], [[20, 31]], [[40, 51]], [[73, 81]]],
    }],
    "annotations": [
        {"area": 21175.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0, "bbox": [293.0, 26.0, 85.0, 249.0],
         "tokens_positive": [[0, 14]]},
        {"area": 44330.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 1, "bbox": [83.0, 67.0, 130.0, 341.0],
         "tokens_positive": [[0, 14]]},
        {"area": 1800.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 2, "bbox": [312.0, 25.0, 60.0, 30.0],
         "tokens_positive": [[20, 31]]},
        {"area": 1000.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 3, "bbox": [205.0, 140.0, 40.0, 25.0],
         "tokens_positive": [[40, 51]]},
        {"area": 166500.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 4, "bbox": [0.0, 0.0, 500.0, 333.0],
         "tokens_positive": [[73, 81]]},
    ],
    "categories": [{"supercategory": "object", "id": 1, "name": "object"}],
}
SENTENCES = ("[/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at [/EN#3/bodyparts their hands] "
             "while hanging out in [/EN#4/scene the yard] .\n")
ANNOTATION_XML = """<annotation>
  <filename>1000092795.jpg</filename>
  <size><width>500</width><height>333</height><depth>3</depth></size>
  <object><name>1</name><bndbox><xmin>293</xmin><ymin>26</ymin><xmax>378</xmax><ymax>275</ymax></bndbox></object>
  <object><name>1</name><bndbox><xmin>83</xmin><ymin>67</ymin><xmax>213</xmax><ymax>408</ymax></bndbox></object>
  <object><name>2</name><name>3</name>
    <bndbox><xmin>312</xmin><ymin>25</ymin><xmax>372</xmax><ymax>55</ymax></bndbox></object>
  <object><name>4</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>500</xmax><ymax>333</ymax></bndbox></object>
  <object><name>5</name><nobndbox>1</nobndbox><scene>0</scene></object>
</annotation>
"""


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_refcoco_reader(tmp_path):
    examples = read_refexp(write(tmp_path / "finetune_refcoco_val.json", REFEXP), tmp_path / "coco", "refcoco")
    assert [e.key for e in examples] == ["0", "1", "2"]
    first = examples[0]
    assert first.prompt == "<grounding><phrase>the lady with the blue shirt</phrase>"  # the original's, no space
    assert first.phrase == "the lady with the blue shirt"
    assert first.truth == (pytest.approx((103.93, 299.99, 238.15, 477.41)),)
    assert first.image_path == tmp_path / "coco" / "train2014" / "COCO_train2014_000000581857.jpg"
    assert examples[2].image_path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"


def test_coco_images_in_a_flat_folder_are_found(tmp_path):
    (tmp_path / "COCO_train2014_000000581857.jpg").write_bytes(b"")
    assert find_image(tmp_path, "COCO_train2014_000000581857.jpg") == tmp_path / "COCO_train2014_000000581857.jpg"
    assert find_image(tmp_path, "COCO_val2014_1.jpg") == tmp_path / "val2014" / "COCO_val2014_1.jpg"  # missing


def test_an_image_is_found_from_its_own_folder_or_the_one_its_name_is_relative_to(tmp_path, monkeypatch):
    image = tmp_path / "shapes-eval" / "images" / "000001.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    assert find_image(tmp_path / "shapes-eval", "images/000001.png") == image
    assert find_image(tmp_path / "shapes-eval" / "images", "images/000001.png") == image
    monkeypatch.chdir(image.parent)
    assert find_image(Path("."), "images/000001.png") == Path("000001.png")
    assert find_image(tmp_path / "shapes-eval" / "images", "masks/000001.png") == (  # another folder's: missing
        tmp_path / "shapes-eval" / "images" / "masks" / "000001.png")
    assert find_image(tmp_path / "shapes-eval", "000001.png") == tmp_path / "shapes-eval" / "000001.png"  # missing


def test_flickr_reader_takes_boxes_from_the_mdetr_annotations(tmp_path):
    examples = read_flickr(write(tmp_path / "final_flickr_separateGT_test.json", FLICKR), tmp_path / "flickr")
    assert [e.key for e in examples] == ["0:0", "0:1", "0:2", "0:3"]
    assert [e.phrase for e in examples] == ["Two young guys", "shaggy hair", "their hands", "the yard"]
    assert examples[0].prompt == "<grounding> <phrase>Two young guys</phrase>"  # nothing before: the original's space
    assert examples[1].prompt == "<grounding>Two young guys with  <phrase>shaggy hair</phrase>"
    assert examples[0].truth == ((293.0, 26.0, 378.0, 275.0), (83.0, 67.0, 213.0, 408.0))  # two men, kept apart
    assert examples[3].truth == ((0.0, 0.0, 500.0, 333.0),)
    assert examples[0].image_path == tmp_path / "flickr" / "1000092795.jpg"
    assert examples[0].types == ()  # MDETR's file has no entity types


def test_flickr_reader_with_the_official_annotations(tmp_path):
    folder = tmp_path / "flickr30k_entities"
    (folder / "Sentences").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    write(folder / "Sentences" / "1000092795.txt", SENTENCES)
    write(folder / "Annotations" / "1000092795.xml", ANNOTATION_XML)
    annotations = write(tmp_path / "final_flickr_separateGT_test.json", FLICKR)
    examples = read_flickr(annotations, tmp_path, FlickrEntities(folder))
    assert [e.types for e in examples[:3]] == [("people",), ("bodyparts",), ("bodyparts",)]
    assert examples[0].truth == ((293.0, 26.0, 378.0, 275.0), (83.0, 67.0, 213.0, 408.0))
    assert examples[1].truth == examples[2].truth == ((312.0, 25.0, 372.0, 55.0),)  # one box named by two phrases
    assert examples[3].types == ("scene",) and examples[3].truth == ((0.0, 0.0, 500.0, 333.0),)
    with pytest.raises(AnnotationFormatError, match="no boxed phrase 'a cat'; do the MDETR file and the"):
        FlickrEntities(folder).truth("1000092795", 0, "a cat")


def test_official_boxes_leave_out_phrases_without_a_box(tmp_path):
    boxes = parse_boxes(write(tmp_path / "1.xml", ANNOTATION_XML))
    assert boxes == {"1": [(293, 26, 378, 275), (83, 67, 213, 408)], "2": [(312, 25, 372, 55)],
                     "3": [(312, 25, 372, 55)], "4": [(0, 0, 500, 333)]}  # 5 has no box


def test_not_the_official_folder(tmp_path):
    with pytest.raises(AnnotationFormatError, match="Sentences/ and Annotations/"):
        FlickrEntities(tmp_path)


@pytest.mark.parametrize(("benchmark", "data", "message"), [
    ("refcoco", FLICKR, "is MDETR's Flickr30k Entities file; score it with --benchmark flickr30k"),
    ("flickr30k", REFEXP, "is an MDETR referring-expression file; score it with --benchmark refcoco"),
    ("refcoco+", REFEXP, "holds refcoco expressions .* score it with --benchmark refcoco"),
    ("refcoco", {"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}], "annotations": []},
     'no "caption" .* expected one of MDETR\'s referring-expression files'),
    ("flickr30k", {"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}], "annotations": []},
     "expected MDETR's Flickr30k Entities file"),
    ("refcoco", [1, 2], 'no "images" and "annotations" lists'),
    ("refcoco", '{"image": "a.png", "task": "referring"}\n{"image": "b.png"}\n', "is not JSON"),
])
def test_a_file_of_the_wrong_kind_names_the_expected_format(tmp_path, benchmark, data, message):
    path = write(tmp_path / "annotations.json", data)
    with pytest.raises(AnnotationFormatError, match=message):
        read_splits(benchmark, [path], tmp_path)


def test_an_expression_with_two_boxes_is_refused(tmp_path):
    broken = json.loads(json.dumps(REFEXP))
    broken["annotations"][1]["image_id"] = 0
    with pytest.raises(AnnotationFormatError, match=r"images\[0\] has 2 annotations, not one"):
        read_refexp(write(tmp_path / "a.json", broken), tmp_path, "refcoco")


def test_unknown_benchmark_and_missing_files(tmp_path):
    with pytest.raises(InvalidRequestError, match="Unknown benchmark 'refclef'; choose one of: refcoco, refcoco"):
        read_splits("refclef", [tmp_path / "a.json"], tmp_path)
    with pytest.raises(AnnotationFormatError, match="no such file"):
        read_splits("refcoco", [tmp_path / "finetune_refcoco_val.json"], tmp_path)
    with pytest.raises(InvalidRequestError, match="--images .* is not a folder"):
        read_splits("refcoco", [tmp_path / "a.json"], tmp_path / "nowhere")


def test_split_names_and_limit_sample(tmp_path):
    names = ("finetune_refcoco_testB.json", "finetune_refcocog_val.json", "final_flickr_mergedGT_val.json", "mine.json")
    assert [split_name(Path(name)) for name in names] == ["testB", "val", "val", "mine"]
    examples = read_flickr(write(tmp_path / "f.json", FLICKR), tmp_path) * 5
    examples = [e.__class__(**{**e.__dict__, "key": str(n)}) for n, e in enumerate(examples)]
    chosen = sample(examples, 7)
    assert [e.key for e in chosen] == [e.key for e in sample(examples, 7)]  # the same sample every run
    assert len(chosen) == 7 and [int(e.key) for e in chosen] == sorted(int(e.key) for e in chosen)
    assert sample(examples, 100) == examples
