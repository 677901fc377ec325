"""Stand-in for torch_scatter's ``scatter`` (torch_geometric's pure-torch one)."""
from torch_geometric.utils import scatter as _scatter


def scatter(src, index, dim=0, out=None, dim_size=None, reduce="sum"):
    return _scatter(src, index, dim=dim, dim_size=dim_size, reduce=reduce)
