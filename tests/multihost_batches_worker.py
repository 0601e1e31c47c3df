"""One process of the two-process batch test (run by test_data_multihost.py, not collected by pytest).

Usage: python multihost_batches_worker.py PROCESS_ID PORT DATA_DIR
Each process reads only its slice of every global batch; the assembled global arrays, gathered back,
must equal the batches a single process builds with no sharding, in order.
"""
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           local_device_ids=list(range(4)))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from simpo_jax.data import BatchIterator, DataConfig  # noqa: E402
from simpo_jax.data.batches import process_row_range  # noqa: E402
from simpo_jax.sharding import batch_sharding, make_mesh  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
data = datasets.load_from_disk(data_dir)
cfg = DataConfig(max_length=128, max_prompt_length=64, bucket_lengths=(32, 64, 128), seed=11)
sharding = batch_sharding(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
assert process_row_range(sharding, 8) == ((0, 4) if process_id == 0 else (4, 8))
sharded = BatchIterator(data, 8, cfg, pad_id=0, sharding=sharding)
reference = BatchIterator(data, 8, cfg, pad_id=0)
for step in range(4):
    batch, want = next(sharded), next(reference)
    for key, value in want.items():
        assert batch[key].shape == value.shape and not batch[key].is_fully_addressable
        got = np.asarray(multihost_utils.process_allgather(batch[key], tiled=True))
        np.testing.assert_array_equal(got, value, err_msg=f"step {step} {key}")
print(f"process {process_id}: 4 global batches match", flush=True)
jax.distributed.shutdown()
