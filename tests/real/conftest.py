"""Fixtures shared by the real-backend tests."""
import pytest


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank (the export synchronises ranks), torn down afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
