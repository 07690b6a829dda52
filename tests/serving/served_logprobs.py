"""Log-probabilities to hold a served answer against: kvc's own runtime's, or the full cache's, along it."""

import torch

import kvc


def own_logprobs(loaded, plan, ids, answer) -> torch.Tensor:
    """(len(answer), vocab) log-probabilities of each answer token, read through `plan` in kvc's own
    runtime along `answer` (the first from the prefill, whose attention is exact); with no plan,
    the model's own full attention."""
    with torch.no_grad():
        if plan is None:
            logits = loaded.model(input_ids=torch.tensor([ids + answer[:-1]])).logits[0, len(ids) - 1:]
            return torch.log_softmax(logits.float(), -1)
        with kvc.apply(loaded, plan) as applied:
            cache, steps = applied.cache(), [ids, *([token] for token in answer[:-1])]
            logits = [loaded.model(input_ids=torch.tensor([step]), **{applied.cache_keyword: cache},
                                   logits_to_keep=1).logits[0, -1] for step in steps]
    return torch.log_softmax(torch.stack(logits).float(), -1)


def top_logprobs(output) -> tuple[torch.Tensor, torch.Tensor]:
    """A vLLM completion's top tokens at each step (steps, k), sorted, and their log-probabilities."""
    tokens = torch.tensor([sorted(position) for position in output.logprobs])
    return tokens, torch.tensor([[position[int(t)].logprob for t in row] for position, row in zip(output.logprobs, tokens)])
