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
