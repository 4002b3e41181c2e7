"""``.nnp`` files: read, fold every network, write back. The file's own protobuf is edited (folded BNs
removed, layers pointed at folded parameters), so executors, other networks, untouched parameters'
names and need_grad flags stay exactly as they were.
"""
import copy
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import numpy as np

from . import protobuf_params
from .backends import get_backend
from .backends.common import FoldError
from .graph import BN_TYPES, Graph
from .plan import OUTPUT_SIDE, FoldSpec, Plan, Skip
from .planner import plan as make_plan


_COPY_CHUNK = 16 << 20   # bytes per read when a member is copied between a scratch file and the archive


class _Silent:
    """The progress of a caller that shows none."""

    def expect(self, nbytes):
        pass

    def extend(self, nbytes):
        pass

    def advance(self, nbytes):
        pass


class _Counted:
    """A binary file object whose reads and writes advance ``progress`` by their bytes."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress

    def read(self, n=-1):
        data = self.f.read(n)
        self.progress.advance(len(data))
        return data

    def write(self, data):
        n = self.f.write(data)
        self.progress.advance(memoryview(data).nbytes)
        return n


class NnpError(ValueError):
    """A file that cannot be read, folded or written as asked; the message is one line."""


@dataclass
class Param:
    value: np.ndarray
    need_grad: bool


@dataclass
class NnpFile:
    path: str
    members: List[zipfile.ZipInfo]
    raw: Dict[str, bytes]              # members written back as read (not the network, parameters)
    network_member: str
    proto: object                      # nnabla_pb2.NNablaProtoBuf of the network definition
    param_member: Optional[str]        # 'parameter.h5' / 'parameter.protobuf', None if in the nntxt
    params: "OrderedDict[str, Param]"

    def network_names(self) -> List[str]:
        return [n.name for n in self.proto.network]


# -- reading --------------------------------------------------------------------------------------
def read(path: str, progress=None) -> NnpFile:
    """Parse ``path``; NnpError with a one-line reason if it is not a usable .nnp file.
    ``progress.advance`` counts the parameter bytes read (``expect``: their total)."""
    from google.protobuf import text_format
    from nnabla.utils import nnabla_pb2

    if not os.path.exists(path):
        raise NnpError(f"{path}: no such file")
    if os.path.isdir(path):
        raise NnpError(f"{path}: is a directory, not an .nnp file")
    progress = progress or _Silent()
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            raw = {m.filename: z.read(m.filename) for m in members if not _is_params(m.filename)}
            progress.expect(sum(m.file_size for m in members if _is_params(m.filename)))
            stored = {m.filename: _read_h5(path, z, m, progress) if _is_h5_params(m.filename)
                      else _read_protobuf(path, z, m, progress)
                      for m in members if _is_params(m.filename)}
    except _ZIP_ERRORS as e:
        raise _not_a_zip(path, e) from None
    nets = [m.filename for m in members if m.filename.endswith((".nntxt", ".prototxt"))]
    if not nets:
        raise NnpError(f"{path}: no network definition (.nntxt or .prototxt) in the archive")
    if len(nets) > 1:   # NNabla would merge them; the networks of all must be planned together
        raise NnpError(f"{path}: {len(nets)} network definitions ({', '.join(nets)}); bnfold reads "
                       f"files with one, as NNabla and Neural Network Console save them")
    proto = nnabla_pb2.NNablaProtoBuf()
    try:
        text_format.Merge(raw[nets[0]].decode("utf-8"), proto)
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise NnpError(f"{path}: network definition {nets[0]} does not parse: {_one_line(e)}") from None
    if not proto.network:
        raise NnpError(f"{path}: the network definition holds no network")
    params: "OrderedDict[str, Param]" = OrderedDict()
    for p in proto.parameter:
        params[p.variable_name] = Param(_proto_value(p), p.need_grad)
    param_member = None   # several parameter members are merged into the last one on output
    for name, entries in stored.items():
        param_member = name
        params.update(entries)
    del raw[nets[0]]      # rewritten on output: its bytes need not stay in memory
    nnp = NnpFile(path, members, raw, nets[0], proto, param_member, params)
    _check_parameters(nnp)
    return nnp


def _proto_value(p) -> np.ndarray:
    data = np.asarray(p.data, np.float32)
    shape = tuple(p.shape.dim)
    if data.size != int(np.prod(shape)):
        raise NnpError(f"parameter '{p.variable_name}' holds {data.size} values for shape {shape}")
    return data.reshape(shape)


def _no_scratch(path, folder, e) -> NnpError:
    return NnpError(f"{path}: cannot copy the parameters to a scratch file in {folder} "
                    f"({e.strerror or _one_line(e)}); set TMPDIR to a folder with room")


# NNabla's loader reads every .h5 and .protobuf member of an .nnp as parameters, whatever its name
# (later members overriding earlier ones), so this does too: one left in the output unread could
# override the folded values.
def _is_h5_params(name: str) -> bool:
    return name.endswith(".h5")


def _is_params(name: str) -> bool:
    return name.endswith((".h5", ".protobuf"))


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error)


def _not_a_zip(path, e) -> NnpError:
    return NnpError(f"{path}: not an .nnp file (not a readable zip archive: {_one_line(e)})")


def _read_protobuf(path, z: zipfile.ZipFile, member: zipfile.ZipInfo, progress):
    """[(name, Param)] of a protobuf parameter member, read a parameter at a time."""
    try:
        with z.open(member) as stream:
            return [(name, Param(value, need_grad))
                    for name, value, need_grad in protobuf_params.read(_Counted(stream, progress))]
    except protobuf_params.ProtobufError as e:
        raise NnpError(f"{path}: {member.filename} does not parse: {e}") from None


def _read_h5(path, z: zipfile.ZipFile, member: zipfile.ZipInfo, progress):
    """[(name, Param)] of an HDF5 parameter member. HDF5 reads at random places, so the member is
    copied to a scratch file first: disk, not a second copy of the weights in memory."""
    import h5py
    out = []
    try:
        scratch_dir = tempfile.TemporaryDirectory(prefix="bnfold-")
    except OSError as e:
        raise _no_scratch(path, tempfile.gettempdir(), e) from None
    with scratch_dir as scratch:
        local = os.path.join(scratch, "parameter.h5")
        with z.open(member) as stream, open(local, "wb") as dst:
            src = _Counted(stream, progress)
            while True:
                try:
                    chunk = src.read(_COPY_CHUNK)
                except _ZIP_ERRORS as e:
                    raise _not_a_zip(path, e) from None
                if not chunk:
                    break
                try:
                    dst.write(chunk)
                except OSError as e:
                    raise _no_scratch(path, scratch, e) from None
        try:
            with h5py.File(local, "r") as hd:
                keys = []
                hd.visit(lambda k: keys.append((hd[k].attrs.get("index", 0), k))
                         if isinstance(hd[k], h5py.Dataset) else None)
                for _, k in sorted(keys):
                    ds = hd[k]
                    out.append((k, Param(ds[...], bool(ds.attrs.get("need_grad", False)))))
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:   # h5py's, on a damaged file
            raise NnpError(f"{path}: {member.filename} does not parse: {_one_line(e)}") from None
    return out


def _check_parameters(nnp: NnpFile):
    """Every parameter a function uses has data of the declared size."""
    for net in nnp.proto.network:
        declared = {v.name: v for v in net.variable}
        for f in net.function:
            for name in f.input:
                v = declared.get(name)
                if v is None or v.type != "Parameter":
                    continue
                if name not in nnp.params:
                    raise NnpError(f"{nnp.path}: network '{net.name}': parameter '{name}' "
                                   f"(input of {f.name}) has no data in the file")
                want = [d for d in v.shape.dim]
                got = nnp.params[name].value.shape
                if int(np.prod(got)) != int(np.prod(want)) or any(d < 0 for d in want):
                    raise NnpError(f"{nnp.path}: network '{net.name}': parameter '{name}' has shape "
                                   f"{tuple(got)}, the network declares {tuple(want)}")


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300]


# -- planning -------------------------------------------------------------------------------------
@dataclass
class NetworkPlan:
    name: str
    plan: Optional[Plan]
    training: bool                     # has a BN with batch_stat=True: never run to verify
    error: Optional[str] = None


@dataclass
class FilePlan:
    networks: List[NetworkPlan]
    folds: Dict[str, List[FoldSpec]] = field(default_factory=dict)   # per network, final names
    unique: List[FoldSpec] = field(default_factory=list)             # the folds to compute
    sources: Dict[str, str] = field(default_factory=dict)

    @property
    def n_folded(self):
        return sum(len(v) for v in self.folds.values())

    @property
    def skipped(self):
        return [(n.name, s) for n in self.networks if n.plan for s in n.plan.skipped]


def _uses(net) -> Dict[str, int]:
    count: Dict[str, int] = {}
    for f in net.function:
        for name in f.input:
            count[name] = count.get(name, 0) + 1
    return count


def _is_training(net) -> bool:
    for f in net.function:
        if f.type in BN_TYPES:
            param = f.batch_normalization_param if f.type == "BatchNormalization" \
                else f.fused_batch_normalization_param
            if param.batch_stat:
                return True
    return False


def structure(proto):
    """A copy of the network definition without parameter values: networks, executors and the rest,
    every field but ``parameter``. Small, whatever the model's size."""
    from nnabla.utils import nnabla_pb2
    out = nnabla_pb2.NNablaProtoBuf()
    for fd, value in proto.ListFields():
        if fd.name == "parameter":
            continue
        if fd.label == fd.LABEL_REPEATED:
            getattr(out, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    return out


def build_networks(path: str, proto, names=None, parsed=False):
    """(loader scope) -> {network name: (graph outputs, NnpNetwork)} built by NNabla in a private
    parameter scope, for the networks of ``proto`` (its network definition; every network, or those
    in ``names``), which name each network's outputs. NNabla loads the file ``path``; with ``parsed``
    it builds from ``proto`` itself, without parameter values (``path`` then only names the file in
    errors)."""
    import nnabla as nn
    from nnabla.core.graph_def import ProtoGraph
    from nnabla.utils.nnp_graph import NnpLoader, NnpNetwork
    nets = {}
    scope = OrderedDict()
    with nn.parameter_scope("", scope):
        try:
            if parsed:   # what NnpLoader does after parsing the file
                graph = ProtoGraph.from_proto(structure(proto), param_scope=scope,
                                              rng=np.random.RandomState(1223))

                def get_network(name):
                    return NnpNetwork(graph.networks[name], batch_size=None, callback=None)
            else:
                get_network = NnpLoader(path).get_network
        except Exception as e:  # NNabla's own loader, on a file our checks passed
            raise NnpError(f"{path}: NNabla cannot load it: {_one_line(e)}") from None
        for net in proto.network:
            if names is not None and net.name not in names:
                continue
            try:
                built = get_network(net.name)
            except Exception as e:
                raise NnpError(f"{path}: network '{net.name}' does not build: {_one_line(e)}") \
                    from None
            outputs = list(built.outputs.values())
            for ex in proto.executor:
                if ex.network_name == net.name:
                    for ov in ex.output_variable:
                        v = built.variables.get(ov.variable_name)
                        if v is not None and v not in outputs:
                            outputs.append(v)
            nets[net.name] = (outputs, built)
    return scope, nets


def plan_file(nnp: NnpFile, progress=None) -> FilePlan:
    """Plan every network of the file and settle the folded parameters' names across networks."""
    import nnabla as nn
    all_names = set(nnp.params)
    for net in nnp.proto.network:
        all_names.update(v.name for v in net.variable)
    uses = {net.name: _uses(net) for net in nnp.proto.network}
    dtypes = {name: p.value.dtype for name, p in nnp.params.items()}
    # planning needs shapes (and the dtypes read() found), not values: NNabla neither parses every
    # weight a second time nor holds a copy of them
    scope, built = build_networks(nnp.path, nnp.proto, parsed=True)
    fp = FilePlan([])
    seen: Dict[tuple, FoldSpec] = {}
    with nn.parameter_scope("", scope):
        for net in nnp.proto.network:
            if progress:
                progress.step(f"planning {net.name}")
            outputs, _ = built[net.name]
            training = _is_training(net)
            if not outputs:
                fp.networks.append(NetworkPlan(net.name, None, training, "no outputs"))
                continue
            p = make_plan(Graph(outputs), inplace=True, reserved=all_names, dtypes=dtypes)
            fp.networks.append(NetworkPlan(net.name, p, training))
            final = []
            for spec in p.folds:
                key = (spec.weight, spec.bias, spec.mean, spec.var, spec.gamma, spec.beta, spec.eps,
                       spec.side, spec.weight_layout, spec.kind)
                if key in seen:
                    prev = seen[key]
                    final.append(replace(spec, folded_weight=prev.folded_weight,
                                         folded_bias=prev.folded_bias))
                    continue
                spec = _settle_names(spec, net.name, uses, all_names, p, fp.sources)
                seen[key] = spec
                fp.unique.append(spec)
                final.append(spec)
            fp.folds[net.name] = final
    return fp


def merge_passes(passes: List[FilePlan]) -> FilePlan:
    """One FilePlan for folds applied in several passes (a layer takes one BN per pass): every
    pass's folds, and the BNs the last pass kept."""
    folds: Dict[str, List[FoldSpec]] = {}
    for fp in passes:
        for network, specs in fp.folds.items():
            folds.setdefault(network, []).extend(specs)
    return FilePlan(passes[-1].networks, folds, [s for fp in passes for s in fp.unique],
                    {k: v for fp in passes for k, v in fp.sources.items()})


def _settle_names(spec, network, uses, taken, p, sources):
    """Arrays folded in place must not be seen by another network: fold into new names there."""
    def elsewhere(name):
        return any(name in u for n, u in uses.items() if n != network)

    def new(base):
        name, k = base, 2
        while name in taken:
            name = f"{base}_{k}"
            k += 1
        taken.add(name)
        return name

    changes = {}
    if spec.weight_in_place and elsewhere(spec.weight):
        changes["folded_weight"] = new(spec.weight + "_folded")
        sources[changes["folded_weight"]] = spec.weight
    if spec.bias is not None and spec.bias_in_place and elsewhere(spec.bias):
        changes["folded_bias"] = new(spec.bias + "_folded")
        sources[changes["folded_bias"]] = spec.bias
    for name in (spec.folded_weight, spec.folded_bias):
        if name in p.sources and name not in changes.values():
            sources[name] = p.sources[name]
            taken.add(name)
    return replace(spec, **changes) if changes else spec


# -- folding --------------------------------------------------------------------------------------
def fold_parameters(nnp: NnpFile, fp: FilePlan, backend: str = "auto"):
    """Compute every folded parameter into ``nnp.params`` (new ones added). Returns (backend name,
    bytes rescaled)."""
    be = get_backend(backend)
    arrays, shapes = {}, {}
    for spec in fp.unique:
        for name in (spec.weight, spec.bias, spec.mean, spec.var, spec.gamma, spec.beta):
            if name is not None:
                value = np.ascontiguousarray(nnp.params[name].value)
                if not value.flags.writeable:
                    value = value.copy()
                nnp.params[name].value = value
                arrays[name] = value
                shapes[name] = (value.shape, value.dtype)
    for spec in fp.unique:   # new arrays take the dtype of what they replace (a new bias: the weight's)
        for name, shape, like in ((spec.folded_weight, spec.weight_shape, spec.weight),
                                  (spec.folded_bias, spec.bias_shape, spec.bias or spec.weight)):
            if name not in arrays:
                arrays[name] = np.empty(shape, arrays[like].dtype)
                shapes[name] = (shape, arrays[name].dtype)
    plan = Plan(tuple(fp.unique), (), shapes)
    be.fold(plan, arrays)   # FoldError: nothing written yet
    for spec in fp.unique:
        for name in (spec.folded_weight, spec.folded_bias):
            if name not in nnp.params:
                src = fp.sources.get(name, spec.weight)
                nnp.params[name] = Param(arrays[name], nnp.params[src].need_grad
                                         if src in nnp.params else False)
    nbytes = sum(arrays[s.folded_weight].nbytes for s in fp.unique)
    return be.name, nbytes


def _references(net):
    names = set()
    for f in net.function:
        names.update(f.input)
        names.update(f.output)
    return names


def rewrite_proto(nnp: NnpFile, fp: FilePlan):
    """Remove each folded BN from its network and point its layer at the folded parameters; drop the
    declarations and parameters the folds left unused (and only those)."""
    used_before = set().union(*(set(_uses(n)) for n in nnp.proto.network))
    for net in nnp.proto.network:
        folds = fp.folds.get(net.name, [])
        if not folds:
            continue
        refs_before = _references(net)
        declared = {v.name: v for v in net.variable}
        for spec in folds:
            _rewrite_one(net, spec, declared)
        refs = _references(net)
        for name in sorted(refs):
            if name in nnp.params and name not in declared:
                v = net.variable.add()
                v.name, v.type = name, "Parameter"
                v.shape.dim.extend(nnp.params[name].value.shape)
                declared[name] = v
        io_names = {v.variable_name for ex in nnp.proto.executor if ex.network_name == net.name
                    for v in list(ex.data_variable) + list(ex.output_variable)}
        keep = [v for v in net.variable
                if v.name in refs or v.name in io_names or v.name not in refs_before]
        del net.variable[:]
        net.variable.extend(keep)
    used_after = set().union(*(set(_uses(n)) for n in nnp.proto.network))
    for name in list(nnp.params):
        if name in used_before and name not in used_after:
            del nnp.params[name]
    for ex in nnp.proto.executor:
        net = next((n for n in nnp.proto.network if n.name == ex.network_name), None)
        if not ex.parameter_variable or net is None or not fp.folds.get(net.name):
            continue
        params_used = [n for n in _uses(net) if n in nnp.params]
        del ex.parameter_variable[:]
        for name in params_used:
            ex.parameter_variable.add().variable_name = name


def _rewrite_one(net, spec: FoldSpec, declared):
    funcs = list(net.function)
    producer = {o: f for f in funcs for o in f.output}
    bn = layer = None
    for f in funcs:
        if f.type != spec.bn_type or spec.mean not in f.input:
            continue
        if spec.side == OUTPUT_SIDE:
            cand = producer.get(f.input[0])
            if cand is not None and cand.type == spec.kind and len(cand.input) > 1 \
                    and cand.input[1] == spec.weight:
                bn, layer = f, cand
                break
        else:
            cand = [g for g in funcs if g.type == spec.kind and g.input and g.input[0] == f.output[0]
                    and len(g.input) > 1 and g.input[1] == spec.weight]
            if len(cand) == 1:
                bn, layer = f, cand[0]
                break
    if bn is None:
        raise NnpError(f"network '{net.name}': cannot locate {spec.bn} and its {spec.kind} in the file")
    del layer.input[1:]
    layer.input.extend([spec.folded_weight, spec.folded_bias])
    position = funcs.index(bn)
    new_functions = []
    if spec.side == OUTPUT_SIDE:
        out = bn.output[0]
        if spec.bn_type == "FusedBatchNormalization":
            linear = _fresh(declared, out + "_linear", declared[out] if out in declared else None, net)
            layer.output[0] = linear
            last = linear
            if len(bn.input) > 5:
                summed = _fresh(declared, out + "_sum", declared.get(out), net)
                add = _new_function(net, "Add2", bn.name + "_add", [linear, bn.input[5]], [summed])
                new_functions.append(add)
                last = summed
            new_functions.append(_new_function(net, "ReLU", bn.name + "_relu", [last], [out]))
        else:
            layer.output[0] = out
    else:
        layer.input[0] = bn.input[0]
    rebuilt = funcs[:position] + new_functions + funcs[position + 1:]
    del net.function[:]
    net.function.extend(rebuilt)


def _fresh(declared, base, like, net):
    name, k = base, 2
    while name in declared:
        name = f"{base}_{k}"
        k += 1
    v = net.variable.add()
    v.name, v.type = name, "Buffer"
    if like is not None:
        v.shape.CopyFrom(like.shape)
    declared[name] = v
    return name


def _new_function(net, type_name, name, inputs, outputs):
    """A function proto named ``name`` (made unique within ``net``), not yet placed in it."""
    from nnabla.utils import nnabla_pb2
    taken = {g.name for g in net.function}
    unique, k = name, 2
    while unique in taken:
        unique = f"{name}_{k}"
        k += 1
    f = nnabla_pb2.Function()
    f.name, f.type = unique, type_name
    f.input.extend(inputs)
    f.output.extend(outputs)
    return f


# -- writing --------------------------------------------------------------------------------------
def serialize(nnp: NnpFile, out, scratch: Optional[str] = None, progress=None) -> None:
    """Write the file to the binary file object ``out``: every member as read, the network definition
    and parameters replaced. HDF5 parameters are written to a scratch file in the folder ``scratch``
    (default: the system's) and copied into the archive, so the weights are never held twice.
    ``progress.advance`` counts the parameter bytes written."""
    progress = progress or _Silent()
    from google.protobuf import text_format
    from nnabla.utils import nnabla_pb2
    proto = nnabla_pb2.NNablaProtoBuf()
    proto.CopyFrom(nnp.proto)
    del proto.parameter[:]
    if nnp.param_member is None:
        _params_to_proto(nnp.params, proto)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for m in map(_new_entry, nnp.members):
            name = m.filename
            if name == nnp.network_member:
                z.writestr(m, text_format.MessageToString(proto))
            elif name == nnp.param_member and _is_h5_params(name):
                _write_h5_member(nnp.params, z, m, scratch, progress)
            elif name == nnp.param_member:
                entries = [(n, p.value, p.need_grad) for n, p in nnp.params.items()]
                m.file_size = protobuf_params.size(entries)   # sizes the header (zip64 or not)
                progress.expect(m.file_size)
                with z.open(m, "w") as dst:
                    protobuf_params.write(_Counted(dst, progress), entries)
            elif _is_params(name):
                continue   # its parameters are in param_member, which holds them all
            else:
                z.writestr(m, nnp.raw[name])


def _params_to_proto(params, proto):
    for name, p in params.items():
        q = proto.parameter.add()
        q.variable_name = name
        q.shape.dim.extend(p.value.shape)
        q.data.extend(np.asarray(p.value, np.float32).reshape(-1).tolist())
        q.need_grad = p.need_grad


_ZIP64_EXTRA = 0x0001   # the extra field holding a zip entry's 64-bit sizes


def _new_entry(member: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A copy of ``member`` to write anew: its name, date, compression and other extra fields, without
    the zip64 sizes of the file it was read from (the writer adds its own where the new size needs them,
    and two in one header confuse other zip tools)."""
    info = copy.copy(member)
    extra, kept = member.extra, b""
    while len(extra) >= 4:
        tag, size = struct.unpack("<HH", extra[:4])
        if tag != _ZIP64_EXTRA:
            kept += extra[:4 + size]
        extra = extra[4 + size:]
    info.extra = kept
    return info


def _write_h5_member(params, z: zipfile.ZipFile, member: zipfile.ZipInfo, scratch, progress):
    """The parameters as the HDF5 ``member`` (an entry of ``_new_entry``) of ``z``; ``progress``
    counts the values written to the scratch file, then the bytes copied into the archive."""
    import h5py
    progress.expect(sum(p.value.nbytes for p in params.values()))
    with tempfile.TemporaryDirectory(prefix=".bnfold-", dir=scratch) as d:
        local = os.path.join(d, "parameter.h5")
        with h5py.File(local, "w") as hd:
            for i, (name, p) in enumerate(params.items()):
                hd[name] = p.value
                hd[name].attrs["need_grad"] = p.need_grad
                hd[name].attrs["index"] = i
                progress.advance(p.value.nbytes)
        member.file_size = os.path.getsize(local)   # sizes the member's header (zip64 or not)
        progress.extend(member.file_size)
        with open(local, "rb") as src, z.open(member, "w") as dst:
            shutil.copyfileobj(src, _Counted(dst, progress), _COPY_CHUNK)


def write_temp(nnp: NnpFile, target: str, progress=None) -> str:
    """Write ``nnp`` to a new temporary file beside ``target``; returns its path. ``os.replace`` it
    onto ``target`` once it is known good (same directory: the rename is atomic)."""
    directory = os.path.dirname(os.path.abspath(target)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp.nnp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            serialize(nnp, f, scratch=directory, progress=progress)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(target):      # keep the replaced file's permissions
            os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        else:                           # mkstemp's 0600 -> what a plain open() would give
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


# -- verifying ------------------------------------------------------------------------------------
def verify(original, folded, networks, seed: int = 0, progress=None):
    """Run each network of ``networks`` from both files on the same seeded random inputs; one record
    per output with max abs / max relative error. ``original`` and ``folded``: (path, network
    definition, as ``structure`` gives it). ``progress.step(label)`` is called as each file is loaded
    and each network run."""
    import nnabla as nn
    runs = []
    for which, (path, proto) in (("original", original), ("folded", folded)):
        if progress:
            progress.step(f"verify: loading the {which} file")
        scope, built = build_networks(path, proto, set(networks))
        results = {}
        with nn.parameter_scope("", scope):
            for name in networks:
                if progress:
                    progress.step(f"verify: running {which} {name}")
                outputs, net = built[name]
                rng = np.random.RandomState(seed)
                for key in sorted(net.inputs):
                    x = net.inputs[key]
                    x.d = rng.standard_normal(x.shape).astype(np.float32)
                got = {}
                for key, y in sorted(net.outputs.items()):
                    y.forward(clear_no_need_grad=True)
                    got[key] = y.d.copy()
                results[name] = got
        runs.append(results)
    records = []
    for name in networks:
        for key, a in runs[0][name].items():
            b = runs[1][name].get(key)
            if b is None or a.shape != b.shape:
                records.append({"network": name, "output": key, "max_abs": float("inf"),
                                "max_rel": float("inf")})
                continue
            diff = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
            scale = float(np.abs(a).max()) if a.size else 0.0
            records.append({"network": name, "output": key, "max_abs": diff,
                            "max_rel": diff / scale if scale > 0 else diff})
    return records


__all__ = ["NnpError", "NnpFile", "read", "plan_file", "merge_passes", "fold_parameters",
           "rewrite_proto", "serialize", "structure", "write_temp", "verify", "FoldError", "Skip"]
