"""One AdamW step of a tiny LM on a fixed batch of 8 sequences, run either as one process on all 8 or
under torchrun with each rank taking its shard; test_common compares the resulting parameters."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

out = sys.argv[1]
torch.set_num_threads(1)
rank, world, device = C.ddp_setup()
model, tok = C.tiny_lm(n_layer=1, d_model=16, seed=0)
model.train()
if rank == 0:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out + ".init")
probs = C.toy_dataset("train", 8, seed=0, domains=tuple(C.TOY_DOMAINS))
ids, mask, resp = C.encode_pairs(tok, [p.prompt for p in probs], [C.toy_trace(p) for p in probs])
B = ids.shape[0]
shard = slice(rank * B // world, (rank + 1) * B // world)  # this rank's prompts
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
logp = C.token_logprobs(model, ids[shard], mask[shard])
loss = -(logp * resp[shard]).sum() / B * world  # global-batch sum / B, scaled: all_reduce_grads averages
loss.backward()
C.all_reduce_grads(model, world)
opt.step()
if C.is_main():
    torch.save(model.state_dict(), out)
C.ddp_cleanup()
