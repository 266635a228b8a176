"""annotate's INPUT arguments: folders, globs, image files, manifests, and the ontology file."""

import json
import os

import pytest
from PIL import Image

from kosmos_serve.collections.inputs import collect_images, read_ontology
from kosmos_serve.errors import InvalidRequestError


def image(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path, format="PNG")
    return path


@pytest.fixture
def tree(tmp_path):
    """photos/ with images at three depths, an upper-case extension, hidden ones, and files that are not images."""
    root = tmp_path / "photos"
    image(root / "b.png")
    image(root / "a" / "x.JPG")
    image(root / "a" / "deeper" / "y.webp")
    image(root / ".hidden.png")
    image(root / ".thumbnails" / "t.png")
    (root / "notes.txt").write_text("not an image list: only named manifests are read\n")
    (root / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    return root


def paths(entries):
    return [entry.path for entry in entries]


def test_a_folder_is_searched_recursively_for_image_extensions(tree):
    entries = collect_images([str(tree)])
    assert paths(entries) == [f"{tree}/b.png", f"{tree}/a/x.JPG", f"{tree}/a/deeper/y.webp"]
    assert all(entry.resolved.is_absolute() and entry.origin == str(tree) for entry in entries)


def test_a_relative_folder_keeps_its_paths_as_given(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    entries = collect_images(["photos/a"])
    assert paths(entries) == ["photos/a/x.JPG", "photos/a/deeper/y.webp"]
    assert entries[0].resolved == tree / "a" / "x.JPG"


def test_a_symlinked_folder_is_followed_and_a_loop_ends(tree):
    os.symlink(tree / "a", tree / "link")
    os.symlink(tree, tree / "a" / "loop")
    entries = collect_images([str(tree)])
    assert len(entries) == 3  # the linked folder holds the same files: each image once


def test_globs_take_matching_images_and_search_matching_folders(tree):
    assert paths(collect_images([f"{tree}/**/*.webp"])) == [f"{tree}/a/deeper/y.webp"]
    assert paths(collect_images([f"{tree}/?"])) == [f"{tree}/a/x.JPG", f"{tree}/a/deeper/y.webp"]
    assert paths(collect_images([f"{tree}/*"])) == [f"{tree}/a/x.JPG", f"{tree}/a/deeper/y.webp", f"{tree}/b.png"]


def test_a_named_file_is_taken_whatever_its_extension(tmp_path):
    odd = image(tmp_path / "scan.image")
    assert paths(collect_images([str(odd)])) == [str(odd)]


def test_an_image_reached_twice_is_annotated_once(tree):
    entries = collect_images([str(tree / "b.png"), str(tree), f"{tree}/*.png"])
    assert paths(entries) == [f"{tree}/b.png", f"{tree}/a/x.JPG", f"{tree}/a/deeper/y.webp"]


def test_a_text_manifest_lists_paths_relative_to_itself(tree, tmp_path):
    manifest = tmp_path / "lists" / "train.txt"
    manifest.parent.mkdir()
    manifest.write_text(f"# the training split\n../photos/b.png\n\n  ../photos/a/x.JPG  \n{tree}/missing.png\r\n")
    entries = collect_images([str(manifest)])
    assert paths(entries) == ["../photos/b.png", "../photos/a/x.JPG", f"{tree}/missing.png"]
    assert [e.resolved for e in entries] == [tree / "b.png", tree / "a" / "x.JPG", tree / "missing.png"]
    assert entries[1].origin == f"{manifest} line 4"  # a missing file is the run's to report: an error line


def test_a_jsonl_manifest_carries_each_images_phrases_and_prompt(tree, tmp_path):
    manifest = tmp_path / "items.jsonl"
    lines = [{"image": str(tree / "b.png"), "phrases": ["a red car", "a dog"], "id": 7},
             {"image": "photos/a/x.JPG", "prompt": "What is red?"},
             {"image": "photos/a/deeper/y.webp", "phrases": []}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    entries = collect_images([str(manifest)])
    assert [(e.path, e.phrases, e.prompt) for e in entries] == [
        (str(tree / "b.png"), ("a red car", "a dog"), None),
        ("photos/a/x.JPG", None, "What is red?"),
        ("photos/a/deeper/y.webp", None, None),
    ]
    assert entries[1].resolved == tree / "a" / "x.JPG"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "a.png"}\n{"image": "b.png",}\n', "items.jsonl line 2 is not valid JSON"),
        ('{"image": "a.png"}\n\n["b.png"]\n', "items.jsonl line 3 is not a JSON object"),
        ('{"path": "a.png"}\n', 'items.jsonl line 1 has no "image"'),
        ('{"image": "a.png", "phrases": "a car"}\n', 'items.jsonl line 1: "phrases" must be a list of strings'),
        ('{"image": "a.png", "prompt": ["Why?"]}\n', 'items.jsonl line 1: "prompt" must be a string'),
        (b'{"image": "a.png"}\n{"image": "\xff.png"}\n', "items.jsonl line 2 is not UTF-8 text"),
    ],
)
def test_an_unreadable_manifest_line_is_named_by_its_number(tmp_path, content, message):
    manifest = tmp_path / "items.jsonl"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidRequestError, match=message):
        collect_images([str(manifest)])


def test_an_image_named_twice_with_other_phrases_is_an_error(tmp_path):
    manifest = tmp_path / "items.jsonl"
    manifest.write_text('{"image": "a.png", "phrases": ["a car"]}\n{"image": "./a.png", "phrases": ["a dog"]}\n')
    with pytest.raises(InvalidRequestError, match=r"items.jsonl line 2 names ./a.png again \(first in .*line 1\)"):
        collect_images([str(manifest)])


def test_inputs_that_name_nothing_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequestError, match="no such file or folder"):
        collect_images([str(tmp_path / "nowhere")])
    with pytest.raises(InvalidRequestError, match="matches no files"):
        collect_images([f"{tmp_path}/*.jpg"])
    with pytest.raises(InvalidRequestError, match="No images found in"):
        collect_images([str(tmp_path / "empty")])


def test_an_ontology_maps_phrases_to_classes(tmp_path):
    path = tmp_path / "ontology.json"
    path.write_text('{"a red car": "car", " a person on a bike ": "cyclist", "a blue car": "car"}')
    assert read_ontology(path) == {"a red car": "car", "a person on a bike": "cyclist", "a blue car": "car"}


@pytest.mark.parametrize(
    "content, problem",
    [
        ('["a red car"]', "it holds a list"),
        ("{}", "it is empty"),
        ('{"a red car": 3}', "the class of 'a red car' is not a non-empty string"),
        ('{"  ": "car"}', "one of its phrases is empty"),
        ("{'a red car': 'car'}", "it is not JSON"),
    ],
)
def test_an_ontology_must_be_a_json_object_of_strings(tmp_path, content, problem):
    path = tmp_path / "ontology.json"
    path.write_text(content)
    shape = "must be a JSON object mapping each prompt phrase to a class name"
    with pytest.raises(InvalidRequestError, match=shape) as error:
        read_ontology(path)
    assert problem in error.value.message
