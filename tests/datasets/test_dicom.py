"""DICOM series -> cached NIfTI: values and world coordinates survive, the cache follows the files, and every
unusable series is named with its reason."""
import collections
import ctypes
import ctypes.util
import locale
import os
import shutil
import struct
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from datasets.dicom import MIN_SLICES, SeriesError, convert_records, convert_series, read_series
from datasets.records import SubjectRecord
from datasets.synthetic_rsna import as_sagittal, dicom_uid, write_dicom_series


def _volume(shape=(16, 12, 14), spacing=(2.0, 2.5, 4.0), origin=(10.0, 20.0, -30.0), seed=0) -> sitk.Image:
    """Random int16 voxels (x, y, z) on an axial LPS grid."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(1, 1000, size=shape[::-1]).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _write(image: sitk.Image, folder, name="s") -> list:
    uid = dicom_uid("test", name)
    return write_dicom_series(image, folder, patient_id="00001", study_uid=uid, series_uid=f"{uid}.1",
                              series_number=1, description=name)


def _nifti_voxels(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_axial_round_trip_keeps_values_and_places_a_voxel_where_dicom_says(tmp_path):
    image = _volume()
    _write(image, tmp_path / "T1wCE")
    path = convert_series(tmp_path / "T1wCE", tmp_path / "cache", stem="00001_T1wCE")
    assert path.parent == tmp_path / "cache" and path.name.startswith("00001_T1wCE.") and path.name.endswith(".nii.gz")
    nifti = nib.load(path)
    # nibabel indexes (x, y, z), ITK's array (z, y, x).
    assert np.array_equal(np.asarray(nifti.dataobj), sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    # Voxel (1, 2, 3): LPS origin (10, 20, -30) + (1*2, 2*2.5, 3*4) = (12, 25, -18), i.e. RAS (-12, -25, -18).
    assert np.allclose(nifti.affine @ [1, 2, 3, 1], [-12, -25, -18, 1])
    assert nib.aff2axcodes(nifti.affine) == ("L", "P", "S")


def test_sagittal_round_trip_keeps_every_voxel_at_its_world_position(tmp_path):
    axial = _volume(seed=1)
    marked = (3, 7, 5)
    axial[marked] = 5000  # brightest voxel: found again after conversion
    sagittal = as_sagittal(axial)
    assert sagittal.GetSize() == (12, 14, 16)  # rows P, columns I, slices R: 16 slices across x
    _write(sagittal, tmp_path / "FLAIR")
    nifti = nib.load(convert_series(tmp_path / "FLAIR", tmp_path / "cache"))
    assert nib.aff2axcodes(nifti.affine) == ("P", "I", "R")
    data = np.asarray(nifti.dataobj)
    found = np.unravel_index(np.argmax(data), data.shape)
    lps = np.array(axial.TransformIndexToPhysicalPoint(marked))
    assert np.allclose((nifti.affine @ [*found, 1])[:3], lps * [-1, -1, 1], atol=1e-4)
    # Every voxel: the sagittal volume mapped back through both affines gives the axial voxels.
    axial_affine = np.diag([-2.0, -2.5, 4.0, 1.0])
    axial_affine[:3, 3] = [-10, -20, -30]
    index = np.argwhere(np.ones(data.shape, bool))
    back = np.linalg.solve(axial_affine, nifti.affine @ np.c_[index, np.ones(len(index))].T)[:3]
    assert np.abs(back - np.rint(back)).max() < 1e-4
    assert np.array_equal(sitk.GetArrayFromImage(axial).transpose(2, 1, 0)[tuple(np.rint(back).astype(int))],
                          data[tuple(index.T)])


def test_conversion_is_cached_and_a_changed_file_makes_a_new_one(tmp_path):
    files = _write(_volume(), tmp_path / "T2w")
    first = convert_series(tmp_path / "T2w", tmp_path / "cache")
    written = first.stat().st_mtime_ns
    assert convert_series(tmp_path / "T2w", tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == written  # found, not converted again
    first.write_bytes(b"damaged")  # an unreadable conversion is made again, not trusted
    assert convert_series(tmp_path / "T2w", tmp_path / "cache") == first
    assert _nifti_voxels(first).shape == (16, 12, 14)
    replacement = _volume(seed=9)
    replacement_files = _write(replacement, tmp_path / "other")
    shutil.copyfile(replacement_files[4], files[4])  # same name and size, other voxels
    second = convert_series(tmp_path / "T2w", tmp_path / "cache")
    assert second != first and first.exists()
    assert np.array_equal(_nifti_voxels(second)[:, :, 4], sitk.GetArrayFromImage(replacement)[4].T)
    os.utime(files[0], ns=(1, 1))  # only the modification time: the key still changes
    assert convert_series(tmp_path / "T2w", tmp_path / "cache") not in (first, second)


def test_missing_and_empty_folders_are_named(tmp_path):
    (tmp_path / "00001" / "T1w").mkdir(parents=True)
    (tmp_path / "00001" / "T1w" / "notes.txt").write_text("not a slice")
    with pytest.raises(SeriesError, match=r"sequence FLAIR: missing sequence folder \(the subject has T1w\)") as error:
        read_series(tmp_path / "00001" / "FLAIR")
    assert error.value.folder == str(tmp_path / "00001" / "FLAIR")
    with pytest.raises(SeriesError, match=r"sequence T1w: empty folder \(no \.dcm files\)"):
        read_series(tmp_path / "00001" / "T1w")


def test_two_series_in_one_folder_are_refused_as_mixed(tmp_path):
    _write(_volume(), tmp_path / "T1wCE", name="first")
    for path in _write(_volume(seed=2), tmp_path / "elsewhere", name="second"):
        shutil.move(path, tmp_path / "T1wCE" / f"Other-{path.name}")
    with pytest.raises(SeriesError, match=r"sequence T1wCE: mixed series, 2 SeriesInstanceUIDs in one folder .*"
                                          r"\(14 files\).*\(14 files\)\); keep one series per folder"):
        read_series(tmp_path / "T1wCE")


def test_too_few_slices_is_refused_and_the_limit_is_an_option(tmp_path):
    _write(_volume(shape=(16, 12, 5)), tmp_path / "T2w")
    assert MIN_SLICES == 10
    with pytest.raises(SeriesError, match=r"sequence T2w: too few slices \(5; at least 10 expected"):
        convert_series(tmp_path / "T2w", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing written for a refused series
    path = convert_series(tmp_path / "T2w", tmp_path / "cache", min_slices=5)
    assert _nifti_voxels(path).shape == (16, 12, 5)
    # The cached conversion is not trusted for a stricter limit either.
    with pytest.raises(SeriesError, match=r"too few slices \(5; at least 6 expected"):
        convert_series(tmp_path / "T2w", tmp_path / "cache", min_slices=6)
    with pytest.raises(ValueError, match="min_slices must be a positive integer, got 0"):
        convert_series(tmp_path / "T2w", tmp_path / "cache", min_slices=0)


def test_an_unreadable_file_is_named(tmp_path):
    files = _write(_volume(), tmp_path / "FLAIR")
    files[2].write_bytes(b"\x00garbage" * 40)
    with pytest.raises(SeriesError, match=r"sequence FLAIR: unreadable DICOM file Image-3\.dcm \(1 of 14 files; "
                                          r"Image-3\.dcm: Unable to determine ImageIO reader"):
        read_series(tmp_path / "FLAIR")


def test_a_missing_middle_slice_is_refused_as_uneven_spacing(tmp_path):
    files = _write(_volume(), tmp_path / "T1w")
    files[6].unlink()
    with pytest.raises(SeriesError, match=r"sequence T1w: slices are not evenly spaced \(gaps from 4 to 8 mm along "
                                          r"the slice normal, typically 4 mm\): a missing or duplicated slice"):
        read_series(tmp_path / "T1w")


def test_a_rescale_slope_that_changes_between_slices_keeps_every_value(tmp_path):
    """Slices 0-5 store 100-150 with slope 1, slices 6-11 store 10000-12750 with slope 4: values up to 51000, beyond
    int16, which ITK chose from the first slice (they wrapped to negative values and were cropped as background)."""
    from tests.datasets.raw_dicom import write_slice

    folder = tmp_path / "T1w"
    folder.mkdir()
    truth = []
    for k in range(12):
        slope, raw = (1, 100 + 10 * k) if k < 6 else (4, 10000 + 250 * k)
        truth.append(slope * raw)
        write_slice(folder / f"Image-{k + 1}.dcm", np.full((8, 9), raw, np.int16), ipp=(0, 0, 2.0 * k),
                    iop=(1, 0, 0, 0, 1, 0), instance=k + 1, slope=slope, intercept=0, sop_uid=f"1.2.3.4.{k + 1}")
    image = read_series(folder)
    assert sitk.GetArrayFromImage(image)[:, 0, 0].tolist() == truth


def _raw_series(folder, positions, orientations) -> None:
    from tests.datasets.raw_dicom import write_slice

    folder.mkdir()
    for k, (ipp, iop) in enumerate(zip(positions, orientations)):
        write_slice(folder / f"Image-{k + 1}.dcm", np.full((9, 9), 100 + k, np.int16), ipp=ipp, iop=iop,
                    instance=k + 1, sop_uid=f"1.2.3.4.{k + 1}")


def test_slices_turned_another_way_in_one_series_are_refused(tmp_path):
    axial, turned = (1, 0, 0, 0, 1, 0), (0, 1, 0, 1, 0, 0)  # rows and columns swapped in slices 4-7
    _raw_series(tmp_path / "T1w", [(0, 0, 2.0 * k) for k in range(12)],
                [turned if 4 <= k < 8 else axial for k in range(12)])
    with pytest.raises(SeriesError, match=r"sequence T1w: slices have different orientations \(ImageOrientationPatient\)"):
        read_series(tmp_path / "T1w")


def test_a_sheared_stack_is_refused_not_straightened(tmp_path):
    """Each slice 1 mm further along x and 2 mm along z: ITK would take 2.24 mm steps along z and drop the shift."""
    _raw_series(tmp_path / "T1w", [(-1.0 * k, 0, 2.0 * k) for k in range(12)], [(1, 0, 0, 0, 1, 0)] * 12)
    with pytest.raises(SeriesError, match=r"sequence T1w: each slice is shifted by up to 1 mm within the slice plane "
                                          r"from the one before \(a sheared or gantry-tilted stack\)"):
        read_series(tmp_path / "T1w")


def test_convert_records_swaps_paths_and_reports_problems_per_subject(tmp_path):
    _write(_volume(), tmp_path / "00001" / "T1wCE")
    good = SubjectRecord("00001", "methylated", (str(tmp_path / "00001" / "T1wCE"),), "00001", source="rsna")
    bad = SubjectRecord("00002", "unmethylated", (str(tmp_path / "00002" / "T1wCE"),), "00002", source="rsna")
    nifti = SubjectRecord("x", "HGG", ("x.nii.gz",), "x", source="brats")
    converted, problems = convert_records([good, bad, nifti], tmp_path / "cache")
    assert [r.subject_id for r in converted] == ["00001", "x"]
    assert converted[0].paths[0].startswith(str(tmp_path / "cache" / "00001_T1wCE."))
    assert converted[1] is nifti  # other sources pass through unchanged
    (problem,) = problems
    assert (problem.subject_id, problem.path) == ("00002", str(tmp_path / "00002" / "T1wCE"))
    assert problem.reason.startswith("sequence T1wCE: missing sequence folder")


def test_dicom_reading_and_writing_leave_the_process_locale_as_it_was(tmp_path):
    """GDCM sets LC_CTYPE to "C" for the whole process; after that, open() without an encoding reads ASCII and a
    report with "±" fails to load. Writing, converting and refusing a series must all leave the locale alone."""
    before = locale.setlocale(locale.LC_ALL)
    _write(_volume(), tmp_path / "FLAIR")
    convert_series(tmp_path / "FLAIR", tmp_path / "cache")
    (tmp_path / "FLAIR" / "Image-3.dcm").write_bytes(b"not dicom")
    with pytest.raises(SeriesError):
        read_series(tmp_path / "FLAIR")
    assert locale.setlocale(locale.LC_ALL) == before
    (tmp_path / "plus-minus.txt").write_text("0.5 ± 0.1", encoding="utf-8")
    assert (tmp_path / "plus-minus.txt").read_text() == "0.5 ± 0.1"


# --- how often the slice files are read ---------------------------------------------------------------------


def _slice_opens(folder, action) -> collections.Counter:
    """How many times each ``.dcm`` file in ``folder`` is opened while ``action()`` runs, by any code in any library:
    the kernel's inotify IN_OPEN events (an IN_CLOSE_NOWRITE between two opens keeps them from being merged)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if not sys.platform.startswith("linux") or not hasattr(libc, "inotify_init1"):
        pytest.skip("counting file opens needs Linux inotify")
    in_open, in_close_nowrite, in_q_overflow, in_nonblock = 0x20, 0x10, 0x4000, os.O_NONBLOCK
    fd = libc.inotify_init1(in_nonblock)
    if fd < 0:
        pytest.skip(f"inotify unavailable (errno {ctypes.get_errno()})")
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(folder), in_open | in_close_nowrite) >= 0
        action()
        opens = collections.Counter()
        while True:
            try:
                events = os.read(fd, 1 << 20)
            except BlockingIOError:
                return opens
            offset = 0
            while offset < len(events):
                _, mask, _, length = struct.unpack_from("iIII", events, offset)
                assert not mask & in_q_overflow, "inotify queue overflowed: counts would be low"
                name = events[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                if mask & in_open and name.endswith(".dcm"):
                    opens[name] += 1
                offset += 16 + length
    finally:
        os.close(fd)


def _read_as_gdcm_sorts_it(folder) -> sitk.Image:
    """The series read with GDCM's order for its SeriesInstanceUID, as read_series read it before it scanned once."""
    (uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    reader.MetaDataDictionaryArrayUpdateOn()
    return reader.Execute()


def _same_image(a: sitk.Image, b: sitk.Image) -> bool:
    return (np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
            and (a.GetSpacing(), a.GetOrigin(), a.GetDirection(), a.GetPixelID())
            == (b.GetSpacing(), b.GetOrigin(), b.GetDirection(), b.GetPixelID()))


@pytest.mark.parametrize("plane", ["axial", "sagittal"])
def test_a_series_headers_are_parsed_once_before_it_is_read(tmp_path, plane):
    """Finding and sorting the series costs one pass over its files (GDCM parses each header once); reading it costs
    what SimpleITK's series reader costs on its own. It used to be two passes: the series ids, then the files of
    the id found. The image is the same as with GDCM's order for the series' SeriesInstanceUID."""
    image = _volume(seed=3)
    folder = tmp_path / "FLAIR"
    files = _write(as_sagittal(image) if plane == "sagittal" else image, folder)
    expected = _read_as_gdcm_sorts_it(folder)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))

    def read_alone():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        reader.MetaDataDictionaryArrayUpdateOn()
        reader.Execute()

    read = []
    opened = _slice_opens(folder, lambda: read.append(read_series(folder)))
    reading = _slice_opens(folder, read_alone)
    assert sorted(opened) == sorted(path.name for path in files)
    assert {name: opened[name] - reading[name] for name in opened} == {path.name: 1 for path in files}
    assert _same_image(read[0], expected)


@pytest.mark.parametrize("other_uid", ["1.2.826.0.1.1", "1.2.826.0.1.3"])  # GDCM lists it before / after ours
def test_another_series_in_files_not_named_dcm_is_not_read(tmp_path, other_uid):
    """Only ``.dcm`` files are the series (the conversion key names them); a copy of another series under other
    names is no mixed series, whichever of the two GDCM finds first."""
    image = _volume(seed=4)
    folder = tmp_path / "T2w"
    write_dicom_series(image, folder, patient_id="00001", study_uid="1.2.826.0.1", series_uid="1.2.826.0.1.2",
                       series_number=2, description="ours")
    for path in write_dicom_series(_volume(shape=(16, 12, 11), seed=5), tmp_path / "elsewhere", patient_id="00001",
                                   study_uid="1.2.826.0.1", series_uid=other_uid, series_number=1, description="other"):
        shutil.move(path, folder / f"{path.stem}.bak")
    assert sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == sorted(["1.2.826.0.1.2", other_uid])
    read = read_series(folder)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert np.allclose(read.GetSpacing(), image.GetSpacing()) and np.allclose(read.GetOrigin(), image.GetOrigin())
