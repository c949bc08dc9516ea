import pytest

from ctp.data import read_chunk
from ctp.synthetic import make_stream


@pytest.fixture(scope="session")
def tiny_stream(tmp_path_factory):
    """The 'tiny' synthetic stream: 4 classes, 2 chunks (class-incremental)."""
    return make_stream(tmp_path_factory.mktemp("tiny-stream"), "tiny")


@pytest.fixture(scope="session")
def tiny_chunks(tiny_stream):
    return [read_chunk(d) for d in tiny_stream.chunks]
