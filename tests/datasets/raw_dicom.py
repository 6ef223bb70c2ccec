"""A minimal explicit-VR little-endian MR DICOM writer (pydicom is not a dependency), for tests that need per-slice
tags that SimpleITK's GDCM writer rewrites (RescaleSlope / RescaleIntercept)."""
import struct

def _el(group, elem, vr, value):
    if isinstance(value, str):
        value = value.encode()
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
    if vr in ("OB", "OW", "UN", "SQ", "UT"):
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value

def us(v): return struct.pack("<H", v)

def write_slice(path, pixels, *, ipp, iop, spacing=(1.0, 1.0), instance=1, slope=None, intercept=None,
                series_uid="1.2.3.4", sop_uid="1.2.3.4.1", thickness=None):
    rows, cols = pixels.shape
    sop_class = "1.2.840.10008.5.1.4.1.1.4"
    ds = b"".join([
        _el(0x0008, 0x0016, "UI", sop_class), _el(0x0008, 0x0018, "UI", sop_uid), _el(0x0008, 0x0060, "CS", "MR"),
        _el(0x0010, 0x0020, "LO", "p"),
        *([_el(0x0018, 0x0050, "DS", f"{thickness:g}")] if thickness is not None else []),
        _el(0x0020, 0x000D, "UI", "1.2.3"), _el(0x0020, 0x000E, "UI", series_uid),
        _el(0x0020, 0x0013, "IS", str(instance)),
        _el(0x0020, 0x0032, "DS", "\\".join(f"{v:g}" for v in ipp)),
        _el(0x0020, 0x0037, "DS", "\\".join(f"{v:.6g}" for v in iop)),
        _el(0x0020, 0x0052, "UI", "1.2.3.5"),
        _el(0x0028, 0x0002, "US", us(1)), _el(0x0028, 0x0004, "CS", "MONOCHROME2"),
        _el(0x0028, 0x0010, "US", us(rows)), _el(0x0028, 0x0011, "US", us(cols)),
        _el(0x0028, 0x0030, "DS", f"{spacing[0]:g}\\{spacing[1]:g}"),
        _el(0x0028, 0x0100, "US", us(16)), _el(0x0028, 0x0101, "US", us(16)), _el(0x0028, 0x0102, "US", us(15)),
        _el(0x0028, 0x0103, "US", us(1)),
        *([_el(0x0028, 0x1052, "DS", f"{intercept:g}")] if intercept is not None else []),
        *([_el(0x0028, 0x1053, "DS", f"{slope:g}")] if slope is not None else []),
        _el(0x7FE0, 0x0010, "OW", pixels.astype("<i2").tobytes()),
    ])
    meta_body = b"".join([_el(0x0002, 0x0001, "OB", b"\0\1"), _el(0x0002, 0x0002, "UI", sop_class),
                          _el(0x0002, 0x0003, "UI", sop_uid), _el(0x0002, 0x0010, "UI", "1.2.840.10008.1.2.1")])
    meta = _el(0x0002, 0x0000, "UL", struct.pack("<I", len(meta_body))) + meta_body
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta + ds)
