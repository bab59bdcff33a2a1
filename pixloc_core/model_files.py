"""COLMAP's binary model files record by record: a region of a model read without the rest, and a
model patched with a changed region instead of written whole.

A city map's model does not fit one process: `images.bin` holds every keypoint of every photo
(about 50 KB a photo at 2,048 keypoints, 0.5 GB for 10,000 photos) and pycolmap holds more than
that in memory. `pixloc map --update` reads the photos around the new ones (`read_region`),
changes that region, and writes the model back (`write_patched`) with the bytes of every other
record copied as they are, so that its memory depends on the region, not on the map.

Every file is a uint64 count, then records, little endian (COLMAP's reconstruction_io_binary.cc):
    cameras.bin   camera_id u32, model i32, width u64, height u64, params f64 x (the model's)
    rigs.bin      rig_id u32, num_sensors u32, [ref sensor: type i32, id u32],
                  other sensors: type i32, id u32, has_pose u8, [qw qx qy qz tx ty tz f64]
    frames.bin    frame_id u32, rig_id u32, qw qx qy qz tx ty tz f64, n u32, n x (type i32, id u32, data u64)
    images.bin    image_id u32, qw qx qy qz tx ty tz f64, camera_id u32, name\\0, n u64, n x (x, y f64, point3D_id u64)
    points3D.bin  point3D_id u64, x y z f64, r g b u8, error f64, n u64, n x (image_id u32, point2D_idx u32)
Records are sorted by id, except images (in the order of registration).
"""
from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

CAMERAS, RIGS, FRAMES, IMAGES, POINTS3D = "cameras.bin", "rigs.bin", "frames.bin", "images.bin", "points3D.bin"
MODEL_FILES = (CAMERAS, RIGS, FRAMES, IMAGES, POINTS3D)
INVALID_POINT3D_ID = 2**64 - 1
CHUNK_BYTES = 8 << 20  # what one read of a model file fetches

_U32, _U64, _I32 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<i")
_POINT2D = np.dtype([("xy", "<f8", 2), ("point3D_id", "<u8")])
_TRACK_ELEMENT = np.dtype([("image_id", "<u4"), ("point2D_idx", "<u4")])
_IMAGE_HEAD = struct.Struct("<I7dI")  # id, pose, camera id; the name follows
_POINT_HEAD = np.dtype([("id", "<u8"), ("xyz", "<f8", 3), ("color", "u1", 3), ("error", "<f8"),
                        ("length", "<u8")])  # the track follows
_POINT_LENGTH_OFFSET = _POINT_HEAD.fields["length"][1]


def _num_params(model_id: int) -> int:
    return len(pycolmap.Camera.create_from_model_id(0, pycolmap.CameraModelId(model_id), 1.0, 1, 1).params)


# Per file: (buffer, offset) -> (id, the record's size in bytes); reads only the record's head.
def _camera_size(buffer: bytes, offset: int) -> tuple[int, int]:
    return _U32.unpack_from(buffer, offset)[0], 24 + 8 * _num_params(_I32.unpack_from(buffer, offset + 4)[0])


def _rig_size(buffer: bytes, offset: int) -> tuple[int, int]:
    rig_id, num_sensors = struct.unpack_from("<II", buffer, offset)
    size = 8 + (8 if num_sensors else 0)
    for _ in range(max(num_sensors - 1, 0)):
        size += 9 + 56 * buffer[offset + size + 8]
    return rig_id, size


def _frame_size(buffer: bytes, offset: int) -> tuple[int, int]:
    return _U32.unpack_from(buffer, offset)[0], 68 + 16 * _U32.unpack_from(buffer, offset + 64)[0]


def _image_size(buffer: bytes, offset: int) -> tuple[int, int]:
    name_end = _name_end(buffer, offset)
    return _U32.unpack_from(buffer, offset)[0], name_end + 9 - offset + 24 * _U64.unpack_from(buffer, name_end + 1)[0]


def _point_size(buffer: bytes, offset: int) -> tuple[int, int]:
    length = _U64.unpack_from(buffer, offset + _POINT_LENGTH_OFFSET)[0]
    return _U64.unpack_from(buffer, offset)[0], _POINT_HEAD.itemsize + _TRACK_ELEMENT.itemsize * length


def _name_end(buffer: bytes, offset: int) -> int:
    """The offset of the NUL that ends the name of the image record at `offset`."""
    return buffer.index(b"\0", offset + _IMAGE_HEAD.size, offset + _IMAGE_HEAD.size + 4096)


_RECORD_SIZE = {CAMERAS: _camera_size, RIGS: _rig_size, FRAMES: _frame_size, IMAGES: _image_size, POINTS3D: _point_size}
# The longest head each reader looks at before it knows the record's size (an image's name: 4 KB at most).
_MAX_HEAD = 64 + 4096 + 8


@dataclass(frozen=True)
class Record:
    id: int
    offset: int  # in its file
    data: bytes


def records(path: Path, keep: Callable[[int, bytes, int], bool] = lambda *_: True) -> Iterator[Record]:
    """The records of a model file, in file order, with their bytes for those that `keep(id,
    buffer, offset)` accepts; read a chunk at a time, never the whole file."""
    record_size = _RECORD_SIZE[Path(path).name]
    with open(path, "rb") as file:
        count = _U64.unpack(file.read(8))[0]
        buffer, start, position = b"", 8, 0  # buffer holds the file from `start`; position: in buffer
        for _ in range(count):
            if len(buffer) - position < _MAX_HEAD:
                buffer, start, position = buffer[position:] + file.read(max(CHUNK_BYTES, _MAX_HEAD)), start + position, 0
            record_id, size = record_size(buffer, position)
            if len(buffer) - position < size:
                buffer, start, position = buffer[position:] + file.read(max(size, CHUNK_BYTES)), start + position, 0
            if keep(record_id, buffer, position):
                yield Record(record_id, start + position, buffer[position:position + size])
            position += size


def count(path: Path) -> int:
    with open(path, "rb") as file:
        return _U64.unpack(file.read(8))[0]


# ----- records written from arrays (a model written in pieces: mapping/model_pieces.py)

def image_record(image_id: int, cam_from_world: pycolmap.Rigid3d, camera_id: int, name: str, xy: np.ndarray,
                 point3D_ids: np.ndarray) -> bytes:
    """An images.bin record: xy (N, 2) the 2D points, point3D_ids (N,) INVALID_POINT3D_ID where none."""
    qx, qy, qz, qw = cam_from_world.rotation.quat
    points2D = np.empty(len(xy), _POINT2D)
    points2D["xy"], points2D["point3D_id"] = xy, point3D_ids
    return (_IMAGE_HEAD.pack(image_id, qw, qx, qy, qz, *cam_from_world.translation.tolist(), camera_id)
            + name.encode() + b"\0" + _U64.pack(len(xy)) + points2D.tobytes())


def point_records(point3D_ids: np.ndarray, xyz: np.ndarray, color: np.ndarray, error: np.ndarray,
                  row_point: np.ndarray, row_image: np.ndarray, row_point2D: np.ndarray) -> bytes:
    """The points3D.bin records of P points (ids (P,), xyz (P, 3), color (P, 3) uint8, error (P,)),
    their tracks given as rows (K,) grouped by point (row_point ascending, index into the P)."""
    length = np.bincount(row_point, minlength=len(point3D_ids))
    heads = np.empty(len(point3D_ids), _POINT_HEAD)
    heads["id"], heads["xyz"], heads["color"], heads["error"], heads["length"] = point3D_ids, xyz, color, error, length
    track = np.empty(len(row_point), _TRACK_ELEMENT)
    track["image_id"], track["point2D_idx"] = row_image, row_point2D
    # Each head is followed by its track: scatter both into one buffer at their offsets.
    head_offset = np.r_[0, np.cumsum(_POINT_HEAD.itemsize + _TRACK_ELEMENT.itemsize * length)]  # (P + 1,)
    first_row = np.r_[0, np.cumsum(length)][:-1]  # (P,)
    row_offset = (head_offset[:-1][row_point] + _POINT_HEAD.itemsize
                  + _TRACK_ELEMENT.itemsize * (np.arange(len(row_point)) - first_row[row_point]))  # (K,)
    out = np.empty(int(head_offset[-1]), np.uint8)
    out[head_offset[:-1, None] + np.arange(_POINT_HEAD.itemsize)] = heads.view(np.uint8).reshape(
        -1, _POINT_HEAD.itemsize)
    out[row_offset[:, None] + np.arange(_TRACK_ELEMENT.itemsize)] = track.view(np.uint8).reshape(
        -1, _TRACK_ELEMENT.itemsize)
    return out.tobytes()


def write_concatenated(path: Path, count: int, pieces: Iterator[bytes]) -> None:
    """A model file of `count` records, given as pieces of whole records in file order."""
    with open(path, "wb") as file:
        file.write(_U64.pack(count))
        for piece in pieces:
            file.write(piece)


# ----- records as pycolmap objects

def read_cameras(model_dir: Path) -> dict[int, pycolmap.Camera]:
    """Every camera of a model (a few per device: small)."""
    cameras = {}
    for record in records(Path(model_dir) / CAMERAS):
        camera_id, model_id, width, height = struct.unpack_from("<IiQQ", record.data)
        cameras[camera_id] = pycolmap.Camera(camera_id=camera_id, model=pycolmap.CameraModelId(model_id),
                                             width=width, height=height,
                                             params=np.frombuffer(record.data, "<f8", offset=24))
    return cameras


def read_posed_images(model_dir: Path) -> pycolmap.Reconstruction:
    """The cameras and posed images of a model (binary or text), without their 2D points and
    without the 3D points: a user's reference model may be a whole SfM model, gigabytes of
    observations of which the map builder needs only the poses. Read a record (a line) at a time."""
    model_dir = Path(model_dir)
    poses = pycolmap.Reconstruction()
    if (model_dir / IMAGES).is_file():
        cameras = read_cameras(model_dir)
        images = (_image_head(record.data) for record in records(model_dir / IMAGES))
    else:
        cameras = _text_cameras(model_dir / "cameras.txt")
        images = _text_image_heads(model_dir / "images.txt")
    for camera in cameras.values():
        poses.add_camera_with_trivial_rig(camera)
    for image_id, cam_from_world, camera_id, name in images:
        poses.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=camera_id, image_id=image_id),
                                           cam_from_world)
    return poses


def _image_head(data: bytes) -> tuple[int, pycolmap.Rigid3d, int, str]:
    image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = _IMAGE_HEAD.unpack_from(data)
    name = data[_IMAGE_HEAD.size:data.index(b"\0", _IMAGE_HEAD.size)].decode()
    return image_id, _rigid(qw, qx, qy, qz, tx, ty, tz), camera_id, name


def _rigid(qw: float, qx: float, qy: float, qz: float, tx: float, ty: float, tz: float) -> pycolmap.Rigid3d:
    return pycolmap.Rigid3d(pycolmap.Rotation3d(np.array([qx, qy, qz, qw])), np.array([tx, ty, tz]))


def _data_lines(path: Path) -> Iterator[str]:
    with open(path) as file:
        for line in file:
            if not line.startswith("#"):
                yield line.rstrip("\n")


def _text_cameras(path: Path) -> dict[int, pycolmap.Camera]:
    cameras = {}
    for line in _data_lines(path):
        if line.strip():
            camera_id, model, width, height, *params = line.split()
            cameras[int(camera_id)] = pycolmap.Camera(camera_id=int(camera_id), model=model, width=int(width),
                                                      height=int(height), params=np.array(params, np.float64))
    return cameras


def _text_image_heads(path: Path) -> Iterator[tuple[int, pycolmap.Rigid3d, int, str]]:
    """images.txt: two lines per image, the head (id, pose, camera id, name), then its 2D points."""
    lines = _data_lines(path)
    for head in lines:
        next(lines, None)
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id, name = head.split(maxsplit=9)
        yield int(image_id), _rigid(*map(float, (qw, qx, qy, qz, tx, ty, tz))), int(camera_id), name


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    cam_from_world: pycolmap.Rigid3d
    camera_id: int
    name: str
    xy: np.ndarray  # (N, 2) float64, the 2D points
    point3D_ids: np.ndarray  # (N,) uint64, INVALID_POINT3D_ID where none

    @classmethod
    def parse(cls, data: bytes) -> ImageRecord:
        image_id, cam_from_world, camera_id, name = _image_head(data)
        points2D = np.frombuffer(data, _POINT2D, offset=data.index(b"\0", _IMAGE_HEAD.size) + 9)
        return cls(image_id, cam_from_world, camera_id, name, points2D["xy"], points2D["point3D_id"])


@dataclass(frozen=True)
class PointRecord:
    point3D_id: int
    xyz: np.ndarray  # (3,)
    color: np.ndarray  # (3,) uint8
    error: float
    track: np.ndarray  # (L,) _TRACK_ELEMENT

    @classmethod
    def parse(cls, data: bytes) -> PointRecord:
        head = np.frombuffer(data, _POINT_HEAD, count=1)[0]
        return cls(int(head["id"]), head["xyz"].copy(), head["color"].copy(), float(head["error"]),
                   np.frombuffer(data, _TRACK_ELEMENT, offset=_POINT_HEAD.itemsize))

    def to_bytes(self) -> bytes:
        return point_records(np.array([self.point3D_id]), self.xyz[None], self.color[None], np.array([self.error]),
                             np.zeros(len(self.track), np.int64), self.track["image_id"], self.track["point2D_idx"])


@dataclass
class Region:
    """A part of a model: the posed images of some names with all their 2D points, every 3D point
    they observe (its track cut to these images), every camera; ids as in the model. New images,
    points and cameras added to it get ids above the model's (`next_*_id`)."""

    reconstruction: pycolmap.Reconstruction
    model_dir: Path
    image_offsets: dict[int, int]  # image id -> its record's offset in images.bin
    points: dict[int, Record]  # the model's record of each point of the region (whole track)
    next_image_id: int
    next_point3D_id: int


def read_region(model_dir: Path, names: Collection[str]) -> Region:
    """The images of `names` (those the model holds) and what a change around them needs."""
    model_dir, names = Path(model_dir), set(names)
    encoded = {name.encode() for name in names}
    cameras = read_cameras(model_dir)
    reconstruction = pycolmap.Reconstruction()
    for camera in cameras.values():
        reconstruction.add_camera_with_trivial_rig(camera)
    image_offsets, last_image_id = {}, 0

    def in_region(image_id: int, buffer: bytes, offset: int) -> bool:
        nonlocal last_image_id
        last_image_id = max(last_image_id, image_id)
        return buffer[offset + _IMAGE_HEAD.size:_name_end(buffer, offset)] in encoded

    point_ids = set()
    for record in records(model_dir / IMAGES, in_region):
        image = ImageRecord.parse(record.data)
        reconstruction.add_image_with_trivial_frame(
            pycolmap.Image(name=image.name, keypoints=image.xy, camera_id=image.camera_id, image_id=image.image_id),
            image.cam_from_world)
        image_offsets[image.image_id] = record.offset
        point_ids.update(image.point3D_ids[image.point3D_ids != INVALID_POINT3D_ID].tolist())
    last_point_id = 0

    def observed(point3D_id: int, *_) -> bool:
        nonlocal last_point_id
        last_point_id = point3D_id  # ascending
        return point3D_id in point_ids

    points = {}
    for record in records(model_dir / POINTS3D, observed):
        points[record.id] = record
        point = PointRecord.parse(record.data)
        region_point = pycolmap.Point3D()
        region_point.xyz, region_point.color, region_point.error = point.xyz, point.color, point.error
        region_point.track = pycolmap.Track([pycolmap.TrackElement(image_id, index) for image_id, index
                                             in point.track.tolist() if image_id in image_offsets])
        reconstruction.add_point3D_with_id(record.id, region_point)
    return Region(reconstruction, model_dir, image_offsets, points, last_image_id + 1, last_point_id + 1)


# ----- writing a patched model

def write_patched(region: Region, changed_image_ids: Collection[int], extended_point_ids: Collection[int],
                  new_point_ids: Collection[int], out_dir: Path) -> None:
    """The model of `region.model_dir` with the region's changes, to out_dir: the changed images'
    records (new images appended), the extended points' tracks grown by their new observations
    (a change never removes one), new points, cameras, rigs and frames appended; every other
    record copied as bytes."""
    out_dir, old = Path(out_dir), region.model_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    changed, extended, new_points = set(changed_image_ids), set(extended_point_ids), set(new_point_ids)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".region-") as temporary:
        written = Path(temporary)
        region.reconstruction.write(written)  # the region's records, as pycolmap writes them
        new_cameras = _new_records(old / CAMERAS, written / CAMERAS, lambda _: True)
        # The region has one rig per camera and one frame per image, under their ids.
        new_rigs = _new_records(old / RIGS, written / RIGS, lambda rig_id: rig_id in new_cameras)
        new_frames = _new_records(old / FRAMES, written / FRAMES, lambda frame_id: frame_id in changed)
        if set(new_rigs) != set(new_cameras) or set(new_frames) != changed - set(region.image_offsets):
            raise ValueError(f"{old}: a rig or frame has the id of a new camera or image; only models with one rig "
                             f"per camera and one frame per image, under their ids (as pixloc map writes them), can "
                             f"be patched")
        for name, added in ((CAMERAS, new_cameras), (RIGS, new_rigs), (FRAMES, new_frames)):
            _patch(old / name, out_dir / name, {}, list(added.values()))
        images = {record.id: record.data for record in records(written / IMAGES, lambda i, *_: i in changed)}
        replaced = {region.image_offsets[i]: images.pop(i) for i in sorted(images) if i in region.image_offsets}
        _patch(old / IMAGES, out_dir / IMAGES, replaced, [images[i] for i in sorted(images)])
        grown = {region.points[i].offset: _grown(region.points[i], region.reconstruction) for i in sorted(extended)}
        added = [record.data for record in records(written / POINTS3D, lambda i, *_: i in new_points)]
        _patch(old / POINTS3D, out_dir / POINTS3D, grown, added)


def _new_records(old: Path, written: Path, wanted: Callable[[int], bool]) -> dict[int, bytes]:
    """The records of `written` whose id `old` lacks and that are `wanted`."""
    old_ids = {record.id for record in records(old)}
    return {record.id: record.data for record in records(written, lambda i, *_: i not in old_ids and wanted(i))}


def _grown(point: Record, reconstruction: pycolmap.Reconstruction) -> bytes:
    """The model's record of a point with the observations the region added to its track; its
    error (the mean reprojection error over the track) updated with theirs."""
    old = PointRecord.parse(point.data)
    known = set(map(tuple, old.track.tolist()))
    added = np.array([(element.image_id, element.point2D_idx)
                      for element in reconstruction.points3D[point.id].track.elements
                      if (element.image_id, element.point2D_idx) not in known], _TRACK_ELEMENT)
    errors = []
    for image_id, point2D_idx in added.tolist():
        image = reconstruction.images[image_id]
        pose = image.cam_from_world()
        projected = image.camera.img_from_cam((pose.rotation.matrix() @ old.xyz + pose.translation)[None])[0]
        errors.append(float(np.linalg.norm(projected - image.points2D[point2D_idx].xy)))
    error = (old.error * len(old.track) + sum(errors)) / (len(old.track) + len(added))
    return PointRecord(old.point3D_id, old.xyz, old.color, error, np.concatenate([old.track, added])).to_bytes()


def _patch(old: Path, out: Path, replaced: dict[int, bytes], appended: list[bytes]) -> None:
    """out = old with the record at each offset of `replaced` swapped for its bytes, and
    `appended` after the last; the count grows by len(appended). The rest is copied in chunks."""
    record_size = _RECORD_SIZE[old.name]
    with open(old, "rb") as source, open(out, "wb") as target:
        target.write(_U64.pack(_U64.unpack(source.read(8))[0] + len(appended)))
        for offset in sorted(replaced):
            _copy(source, target, offset - source.tell())
            head = source.read(_MAX_HEAD)
            _, size = record_size(head, 0)
            source.seek(offset + size)
            target.write(replaced[offset])
        shutil.copyfileobj(source, target, CHUNK_BYTES)
        for data in appended:
            target.write(data)


def _copy(source, target, size: int) -> None:
    while size > 0:
        chunk = source.read(min(size, CHUNK_BYTES))
        target.write(chunk)
        size -= len(chunk)
