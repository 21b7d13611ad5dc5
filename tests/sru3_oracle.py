"""Runs ``sru`` 3.0.0.dev6's plain ``SRU`` in a child process (it cannot share a process with the
``sru`` 2.6 that the test extra installs): for each configuration it saves the perturbed
state_dict (3.0's layout: U's matrices in ``transform_module``), the inputs, the outputs and the
gradients of a linear functional of (h, c) (float64, CPU, train mode, dropout 0).

    python sru3_oracle.py SRU3_DIR CONFIGS.json OUT.pt

A configuration (see tests/test_sru_parity.py): ``args`` (input_size, hidden_size), ``kwargs`` of
SRU, ``L``, ``B``, ``lengths`` (of the sequences, or null: no mask_pad), ``c0`` (bool), ``seed``.
"""

import json
import os
import sys
import warnings


def make_case(config, torch, padding_mask):
    """x, c0, mask_pad and the weights of the linear functional of one configuration."""
    g = torch.Generator().manual_seed(config["seed"] + 100)
    dtype = torch.float64
    input_size, hidden = config["args"]
    kwargs = config["kwargs"]
    L, B, layers = config["L"], config["B"], kwargs.get("num_layers", 2)
    dirs = 2 if kwargs.get("bidirectional") else 1
    case = {"x": torch.randn(L, B, input_size, generator=g, dtype=dtype)}
    case["c0"] = (0.5 * torch.randn(layers, B, hidden * dirs, generator=g, dtype=dtype)
                  if config["c0"] else None)
    case["mask_pad"] = padding_mask(config["lengths"], L) if config["lengths"] else None
    case["weight_h"] = torch.randn(L, B, hidden * dirs, generator=g, dtype=dtype)
    c_shape = ((layers * dirs, B, hidden) if kwargs.get("nn_rnn_compatible_return")
               else (layers, B, hidden * dirs))
    case["weight_c"] = torch.randn(c_shape, generator=g, dtype=dtype)
    return case


def run_case(model, case):
    """Forward and backward of sum(h * weight_h) + sum(c * weight_c): outputs and the gradients
    of x, c0 and every parameter (by name)."""
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(True)
    x, c0 = leaf(case["x"]), leaf(case["c0"])
    h, c = model(x, c0, mask_pad=case["mask_pad"])
    ((h * case["weight_h"]).sum() + (c * case["weight_c"]).sum()).backward()
    return {"h": h.detach(), "c": c.detach(), "grad_x": x.grad,
            "grad_c0": None if c0 is None else c0.grad,
            "grad_params": {name: p.grad for name, p in model.named_parameters()
                            if p.grad is not None}}


def start(sru3_dir, configs_path):
    """The child's start, shared with srupp_oracle.py: sru 3.0 from ``sru3_dir`` and this folder
    made importable, sru imported and its version checked; returns (sru, configs)."""
    sys.path.insert(0, sru3_dir)
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its CUDA kernels do not build here
        import sru
    if sru.__version__ != "3.0.0.dev6":
        sys.exit(f"expected sru 3.0.0.dev6 from {sru3_dir}, got {sru.__version__} from "
                 f"{sru.__file__}")
    with open(configs_path) as f:
        return sru, json.load(f)


def main(sru3_dir, configs_path, out_path):
    sru, configs = start(sru3_dir, configs_path)
    import torch
    from parity_helpers import padding_mask, perturb
    results = {"sru_file": sru.__file__, "cases": {}}
    for name, config in configs.items():
        torch.manual_seed(config["seed"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # use_tanh is deprecated in sru 3.0
            model = sru.SRU(*config["args"], **config["kwargs"]).double()
        perturb(model, config["seed"] + 1)
        model.train()
        case = make_case(config, torch, padding_mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Running SRU on CPU with grad_enabled=True"
            outputs = run_case(model, case)
        results["cases"][name] = {"state": model.state_dict(), "inputs": case,
                                  "outputs": outputs}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
