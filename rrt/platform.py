"""The platform a computation is traced for: the abstract mesh in context when there is one (rrt.train and rrt.aot
trace under the mesh of their devices, a TPU slice's included when compiling ahead of time on a CPU), else JAX's
default backend. Kernel choices that depend on the target (rrt.attention's "auto", rrt.lora's mixed-precision dot)
read it here, at trace time."""

import jax


def context() -> tuple[str, bool]:
    """(platform, whether a Mosaic kernel can be partitioned here): the abstract mesh in context decides both;
    without one, the default backend, and partitioning only on a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None:
        return device.platform, True
    return jax.default_backend(), jax.device_count() == 1


def name() -> str:
    """The platform name: cpu, gpu, tpu, ... (see the module doc)."""
    return context()[0]
