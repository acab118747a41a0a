"""Each memory figure says what it is: `train`'s peak names process RSS or live tensors on a CPU and CUDA
allocated/reserved on a GPU, with how it relates to `estimate` and `profile` (docs/memory.md, "Which memory")."""

from qlora_phi3.memory.meter import MemoryStats


def test_cpu_rss_is_named_and_related_to_the_estimate():
    rss = MemoryStats("cpu", 0.885, 0.885, process_rss_gib=0.885, measure="rss")
    assert rss.short() == "0.885 GiB process RSS"
    assert "live tensors, what `estimate` and `profile` count" in rss.explained()
    tensors = MemoryStats("cpu", 0.11, 0.11)
    assert tensors.short() == "0.110 GiB live tensors" and "`estimate` predicts on a CPU" in tensors.explained()


def test_cuda_figures_are_named_with_the_driver_view():
    cuda = MemoryStats("cuda:0", 4.1, 4.5, driver_used_gib=5.0)
    assert cuda.short() == "4.10/4.50 GiB CUDA alloc/reserved"
    assert "reserved + the CUDA context = driver used" in cuda.explained() and "driver used 5.00 GiB" in cuda.explained()
