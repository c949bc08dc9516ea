import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a small CPU: one thread avoids oversubscription when tests run beside
    # other processes, and keeps timings and results repeatable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
