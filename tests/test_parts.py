"""Resume parts (mutdet.stages.parts): current, stale and unreadable parts, the todo listing, atomic writes,
reading back in order, and the sweep of stale parts."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mutdet.embedding.artefacts import embeddings_schema, vector_column
from mutdet.io.artefacts import TILES_SCHEMA, read_metadata, write_artefact
from mutdet.stages import parts


def tiles_table(*tile_ids):
    return pa.Table.from_pylist([{"tile_id": t, "image_id": "img", "source_path": "img.png", "tile_path": f"{t}.png",
                                  "rate": 1.0, "x": 0, "y": 0, "size": 64, "valid_width": 64, "valid_height": 64,
                                  "image_width": 64, "image_height": 64} for t in tile_ids], schema=TILES_SCHEMA)


def test_chunk_paths_keep_their_names(tmp_path):
    assert parts.chunk_paths(tmp_path, "abc", 2) == [tmp_path / "parts" / "chunk-00000.abc.parquet",
                                                     tmp_path / "parts" / "chunk-00001.abc.parquet"]


def test_current_and_stale_parts(tmp_path):
    path = tmp_path / "parts" / "p.parquet"
    assert not parts.is_current(path, "k", {})  # missing
    parts.write(tiles_table("a", "b"), path, "tiles", "k", tile_ids=["a", "b"], rows=2)
    assert read_metadata(path) == {"params_hash": "k", "tile_ids": ["a", "b"], "rows": 2}
    assert parts.is_current(path, "k", {"tile_ids": ["a", "b"], "rows": 2})
    assert parts.is_current(path, "k", {"rows": 2})  # only the expected values are compared
    assert not parts.is_current(path, "other", {"tile_ids": ["a", "b"]})  # other parameters
    assert not parts.is_current(path, "k", {"tile_ids": ["a", "c"]})  # other tiles
    assert not parts.is_current(path, "k", {"inputs": [1, 2]})  # a value the part does not hold
    assert not parts.is_current(path, "k", {"bad_tiles": []})


def test_part_written_before_the_helper_stays_current(tmp_path):
    """Result folders of earlier runs stay reusable: same names, same metadata."""
    [path] = parts.chunk_paths(tmp_path, "k", 1)
    write_artefact(tiles_table("a"), path, "tiles", {"params_hash": "k", "tile_ids": ["a"], "bad_tiles": []})
    assert parts.is_current(path, "k", {"tile_ids": ["a"], "bad_tiles": []})
    again = tmp_path / "again.parquet"
    parts.write(tiles_table("a"), again, "tiles", "k", tile_ids=["a"], bad_tiles=[])
    assert pq.read_schema(again).metadata == pq.read_schema(path).metadata


@pytest.mark.parametrize("content", [b"", b"not parquet", b"PAR1 truncated"])
def test_unreadable_part_is_recomputed(tmp_path, content):
    path = tmp_path / "parts" / "p.parquet"
    path.parent.mkdir()
    path.write_bytes(content)
    assert not parts.is_current(path, "k", {})
    assert parts.todo([path], "k", [{}]) == [0]


def test_part_of_several_files_is_current_when_each_is(tmp_path):
    objects, tiles = tmp_path / "im.objects.parquet", tmp_path / "im.tiles.parquet"
    for path in (objects, tiles):
        parts.write(tiles_table("a"), path, "tiles", "k", inputs=[1, 2])
    assert parts.is_current((objects, tiles), "k", {"inputs": [1, 2]})
    assert not parts.is_current((objects, tiles), "k", {"inputs": [1, 3]})  # an input edited since
    parts.write(tiles_table("a"), objects, "tiles", "other", inputs=[1, 2])  # a killed run of other parameters
    assert not parts.is_current((objects, tiles), "k", {"inputs": [1, 2]})
    objects.unlink()
    assert not parts.is_current((objects, tiles), "k", {"inputs": [1, 2]})


def test_todo_lists_the_parts_not_current_in_order(tmp_path):
    paths = parts.chunk_paths(tmp_path, "k", 4)
    expect = [{"tile_ids": [str(k)]} for k in range(4)]
    parts.write(tiles_table("0"), paths[0], "tiles", "k", tile_ids=["0"])
    parts.write(tiles_table("x"), paths[2], "tiles", "k", tile_ids=["x"])  # another chunking
    parts.write(tiles_table("3"), paths[3], "tiles", "k", tile_ids=["3"])
    assert parts.todo(paths, "k", expect) == [1, 2]
    assert parts.todo(paths, "other", expect) == [0, 1, 2, 3]
    assert parts.todo([], "k", []) == []


def test_failed_write_leaves_the_previous_part(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    parts.write(tiles_table("a"), path, "tiles", "k", tile_ids=["a"])

    def killed(table, where, **kwargs):
        where.write_bytes(b"half a file")
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(pq, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        parts.write(tiles_table("b"), path, "tiles", "k2", tile_ids=["b"])
    assert parts.is_current(path, "k", {"tile_ids": ["a"]}) and not parts.is_current(path, "k2", {"tile_ids": ["b"]})
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]


def test_read_concatenates_parts_in_order_with_their_metadata(tmp_path):
    paths = parts.chunk_paths(tmp_path, "k", 2)
    parts.write(tiles_table("b", "c"), paths[1], "tiles", "k", tile_ids=["b", "c"])
    parts.write(tiles_table("a"), paths[0], "tiles", "k", tile_ids=["a"])
    table, metas = parts.read(paths, "tiles")
    assert table.column("tile_id").to_pylist() == ["a", "b", "c"]
    assert [m["tile_ids"] for m in metas] == [["a"], ["b", "c"]]
    empty, metas = parts.read([], "tiles")
    assert empty.num_rows == 0 and empty.schema.equals(TILES_SCHEMA) and metas == []


def test_embedding_parts(tmp_path):
    paths = parts.chunk_paths(tmp_path, "k", 2)
    vectors = np.arange(12, dtype=np.float16).reshape(3, 4)
    for path, (start, stop) in zip(paths, [(0, 1), (1, 3)]):
        table = pa.table({"tile_id": ["t"] * (stop - start), "proposal_index": pa.array(range(start, stop), pa.int32()),
                          "embedding": vector_column(vectors[start:stop])})
        parts.write(table, path, "embeddings", "k", rows=stop - start)
    assert parts.todo(paths, "k", [{"rows": 1}, {"rows": 2}]) == []
    table, metas = parts.read(paths, "embeddings")
    assert table.column("proposal_index").to_pylist() == [0, 1, 2] and [m["rows"] for m in metas] == [1, 2]
    empty, _ = parts.read([], "embeddings", empty=embeddings_schema(4).empty_table())
    assert empty.num_rows == 0 and empty.schema.field("embedding").type == pa.list_(pa.float16(), 4)


def test_remove_stale_keeps_current_parts(tmp_path):
    current = parts.chunk_paths(tmp_path, "new", 2)
    stale = parts.chunk_paths(tmp_path, "old", 3)
    for path in current + stale:
        parts.write(tiles_table("a"), path, "tiles", path.suffixes[0][1:])
    other = tmp_path / "parts" / "im0.tiles.parquet"  # not a chunk part: left alone
    other.write_bytes(b"x")
    parts.remove_stale(tmp_path, current)
    assert sorted((tmp_path / "parts").iterdir()) == sorted(current + [other])
    assert parts.todo(current, "new", [{}, {}]) == []
    parts.remove_stale(tmp_path / "nothing", [])  # no parts folder: nothing to do


def test_parts_stream_into_one_file_a_batch_at_a_time(tmp_path):
    """batches() yields each part's rows in order, at most batch_rows at a time; write_artefact_batches
    writes them as write_artefact would, atomically (a failure leaves neither the file nor a temporary)."""
    from mutdet.io.artefacts import ArtefactError, read_artefact, write_artefact_batches

    paths = parts.chunk_paths(tmp_path, "k", 3)
    ids = [[f"t{k}{i}" for i in range(n)] for k, n in enumerate((5, 0, 7))]
    for path, chunk in zip(paths, ids):
        parts.write(tiles_table(*chunk), path, "tiles", "k", tile_ids=chunk)
    got = list(parts.batches(paths, batch_rows=3))
    assert [k for k, _ in got] == [0, 0, 2, 2, 2] and max(b.num_rows for _, b in got) == 3
    final = tmp_path / "tiles.parquet"
    assert write_artefact_batches((b for _, b in got), final, "tiles", {"params_hash": "k"}) == 12
    whole = tmp_path / "whole.parquet"
    write_artefact(tiles_table(*(t for chunk in ids for t in chunk)), whole, "tiles", {"params_hash": "k"})
    assert read_artefact(final, "tiles").equals(read_artefact(whole, "tiles"))
    assert read_metadata(final) == read_metadata(whole) == {"params_hash": "k"}

    def broken():
        yield tiles_table("x")
        yield tiles_table("y").drop_columns(["tile_path"])

    with pytest.raises(ArtefactError, match=r"broken\.parquet misses columns \['tile_path'\]"):
        write_artefact_batches(broken(), tmp_path / "broken.parquet", "tiles")
    assert not list(tmp_path.glob("*broken*"))


def test_committed_needs_the_final_file_and_the_manifest_of_the_same_key(tmp_path):
    import json

    final, manifest = tmp_path / "out.parquet", tmp_path / "manifest.json"
    assert parts.committed(final, manifest, "k") is None  # nothing yet
    write_artefact(tiles_table("a", "b"), final, "tiles", {"params_hash": "k"})
    assert parts.committed(final, manifest, "k") is None  # no manifest: a crash before it was written
    manifest.write_text(json.dumps({"params_hash": "k", "n": 1}))
    assert parts.committed(final, manifest, "k") == {"params_hash": "k", "n": 1}
    assert parts.committed(final, manifest, "k", rows=2) is not None
    assert parts.committed(final, manifest, "k", rows=3) is None
    assert parts.committed(final, manifest, "other") is None
    manifest.write_text("{not json")
    assert parts.committed(final, manifest, "k") is None
    [path] = parts.chunk_paths(tmp_path, "k", 1)
    parts.write(tiles_table("a"), path, "tiles", "k")
    (tmp_path / "parts" / "keep.txt").write_text("not a part")
    parts.remove_all(tmp_path)
    assert not path.exists() and (tmp_path / "parts" / "keep.txt").exists()  # only part files go
    (tmp_path / "parts" / "keep.txt").unlink()
    parts.remove_all(tmp_path)
    assert not (tmp_path / "parts").exists()
