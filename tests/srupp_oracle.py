"""Runs ``sru`` 3.0.0.dev6's SRUpp, the SRU++ parity oracle, in a child process (it cannot share a
process with the ``sru`` 2.6 that the test extra installs): for each configuration it saves the
initial and the perturbed state_dict, the inputs, the outputs and every gradient (float64, CPU).

    python srupp_oracle.py SRU3_DIR CONFIGS.json OUT.pt

A configuration (see tests/test_srupp_parity.py): ``args`` (input_size, hidden_size, proj_size),
``kwargs`` of SRUpp, ``L``, ``B``, ``memory`` (steps, 0 for none), ``memory_none`` (layers whose
memory entry is None), ``lengths`` (of the sequences, or null: no mask_pad), ``memory_pad``
(padded memory steps per sequence, or null: no memory_mask_pad), ``attn_mask`` ("none",
"causal" or "random"), ``c0`` (bool), ``train`` (train or eval mode) and ``seed``.
"""

import inspect
import os
import sys
import warnings


def make_case(config, torch, padding_mask):
    """The inputs of one configuration: x, c0, mask_pad, attn_mask, memory, memory_mask_pad,
    and the weights of the linear functional whose gradient is compared."""
    g = torch.Generator().manual_seed(config["seed"] + 100)
    dtype = torch.float64
    input_size, hidden, _ = config["args"]
    kwargs = config["kwargs"]
    L, B, M = config["L"], config["B"], config["memory"]
    layers = kwargs.get("num_layers", 2)
    out = hidden * (2 if kwargs.get("bidirectional") else 1)
    first = out if kwargs.get("proj_input_to_hidden_first") and input_size != out else input_size
    case = {"x": torch.randn(L, B, input_size, generator=g, dtype=dtype)}
    case["c0"] = (0.5 * torch.randn(layers, B, out, generator=g, dtype=dtype)
                  if config["c0"] else None)
    case["mask_pad"] = padding_mask(config["lengths"], L) if config["lengths"] else None
    case["memory"] = None
    case["memory_mask_pad"] = None
    if M:
        case["memory"] = [None if i in config["memory_none"] else
                          torch.randn(M, B, first if i == 0 else out, generator=g, dtype=dtype)
                          for i in range(layers)]
        if config["memory_pad"] is not None:
            # padding at the start of the memory (the oldest steps)
            steps = torch.arange(M).unsqueeze(1)
            case["memory_mask_pad"] = steps < torch.tensor(config["memory_pad"]).unsqueeze(0)
    S = M + L
    if config["attn_mask"] == "causal":
        case["attn_mask"] = torch.triu(torch.full((L, S), float("-inf"), dtype=dtype),
                                       diagonal=M + 1)
    elif config["attn_mask"] == "random":
        case["attn_mask"] = torch.randn(L, S, generator=g, dtype=dtype)
    else:
        case["attn_mask"] = None
    case["weight_h"] = torch.randn(L, B, out, generator=g, dtype=dtype)
    c_shape = ((layers * (2 if kwargs.get("bidirectional") else 1), B, hidden)
               if kwargs.get("nn_rnn_compatible_return") else (layers, B, out))
    case["weight_c"] = torch.randn(c_shape, generator=g, dtype=dtype)
    return case


def run_case(model, case, torch):
    """Forward and backward of sum(h * weight_h) + sum(c * weight_c); returns outputs and the
    gradients of x, c0, memory and every parameter (by name)."""
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(True)
    x, c0 = leaf(case["x"]), leaf(case["c0"])
    memory = None if case["memory"] is None else [leaf(m) for m in case["memory"]]
    h, c, state = model(x, c0, mask_pad=case["mask_pad"], attn_mask=case["attn_mask"],
                        memory=memory, memory_mask_pad=case["memory_mask_pad"])
    ((h * case["weight_h"]).sum() + (c * case["weight_c"]).sum()).backward()
    return {
        "h": h.detach(), "c": c.detach(),
        "saved_inputs": [s.detach() for s in state["saved_inputs"]],
        "grad_x": x.grad, "grad_c0": None if c0 is None else c0.grad,
        "grad_memory": None if memory is None else [None if m is None else m.grad
                                                    for m in memory],
        "grad_params": {name: p.grad for name, p in model.named_parameters()},
    }


def main(sru3_dir, configs_path, out_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sru3_oracle import start
    sru, configs = start(sru3_dir, configs_path)
    import torch
    from parity_helpers import padding_mask, perturb

    def signature(cls, method):
        parameters = inspect.signature(getattr(cls, method)).parameters.values()
        return [(p.name, repr(p.default)) for p in parameters]

    results = {"sru_file": sru.__file__, "cases": {}, "signatures": {
        name: {method: signature(getattr(sru.modules, name), method)
               for method in ("__init__", "forward")}
        for name in ("SRUpp", "SRUppCell", "SRUppAttention", "SRUppProjectedLinear")}}
    for name, config in configs.items():
        torch.manual_seed(config["seed"])
        model = sru.SRUpp(*config["args"], **config["kwargs"])
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        model = model.double()
        perturb(model, config["seed"] + 1)
        model.train(config["train"])
        case = make_case(config, torch, padding_mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Running SRU on CPU with grad_enabled=True"
            outputs = run_case(model, case, torch)
        results["cases"][name] = {"initial_state": initial, "state": model.state_dict(),
                                  "inputs": case, "outputs": outputs}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
