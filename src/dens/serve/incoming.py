"""A C-STORE's data set on its way into the spool: written to a file as it arrives, never held in memory.

pynetdicom gathers a C-STORE's data set in a BytesIO, so a node receiving 16 instances of 500 MiB holds 8 GiB
before its handler runs. Here each association's DIMSE provider gives every message an :class:`InstanceFile`
instead: the file meta information and the fragments go straight to a hidden file in the spool's incoming
folder (the spool's file system, so the instance is renamed into place, never copied), and past the node's
instance-size limit the rest is counted and dropped, so the sender still gets an answer (a refusal) and the
node's memory and disk stay bounded whatever the sender says. A hidden file left by a crash is removed when the
node starts again (:func:`dens.serve.node.recover`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from io import BytesIO
from pathlib import Path

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dsutils import create_file_meta, encode_file_meta

INCOMING = ".incoming"  # the folder in the spool that holds instances still arriving


class InstanceFile(BytesIO):
    """A message's data set as it arrives (pynetdicom writes the fragments through :meth:`write`): in a file
    named :attr:`path`, preceded by the file meta information of the message's association; past ``limit``
    bytes, or once the disk refused a write (:attr:`error`), counted in :attr:`size` and no longer kept."""

    def __init__(self, folder: Path, limit: int, dimse: DIMSEServiceProvider, message: DIMSEMessage):
        super().__init__()
        self.folder, self.limit = folder, limit
        self.size = 0  # bytes of data set received, kept or not
        self.path: Path | None = None
        self.error: OSError | None = None
        self._file = None
        self._dimse, self._message = dimse, message

    @property
    def over(self) -> bool:
        """Whether the data set is larger than the limit."""
        return self.size > self.limit

    def write(self, data) -> int:
        self.size += len(data)
        if self.over or self.error is not None:
            self.discard()
            return len(data)
        try:
            if self._file is None:
                self._open()
            self._file.write(data)
        except OSError as exc:  # a full or unwritable spool: the sender is told so, once all has arrived
            self.error = exc
            self.discard()
        return len(data)

    def _open(self) -> None:
        self.folder.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".", suffix=".part", dir=self.folder)
        self.path, self._file = Path(name), os.fdopen(fd, "wb")
        self._file.write(b"\x00" * 128 + b"DICM" + encode_file_meta(self._file_meta()))

    def _file_meta(self):
        """The file meta information :meth:`pynetdicom.events.Event.encoded_dataset` gives the instance: its
        SOP class and instance from the C-STORE request, the transfer syntax of the context it came on."""
        command = self._message.command_set
        context_id = self._message.context_id
        syntax = next(
            cx.transfer_syntax[0] for cx in self._dimse.assoc.accepted_contexts if cx.context_id == context_id
        )
        return create_file_meta(
            sop_class_uid=command.AffectedSOPClassUID,
            sop_instance_uid=command.AffectedSOPInstanceUID,
            transfer_syntax=syntax,
        )

    def finish(self) -> Path:
        """The complete file, flushed to the disk (OSError when it cannot be)."""
        if self._file is None:  # an empty data set: the file meta alone
            self._open()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.path

    def discard(self) -> None:
        """Close and remove the file (once it is renamed into the spool, there is nothing to remove). Never
        raises: on a full disk, closing flushes what the file buffers and fails, though the file is closed."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._file = self.path = None

    def getvalue(self) -> bytes:
        return b""  # the data set is on the disk, at :attr:`path` (pynetdicom's debug log reads this)

    def __del__(self) -> None:  # an association that ended mid-instance
        with contextlib.suppress(Exception):
            self.discard()


class SpoolingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, each incoming message's data set an :class:`InstanceFile`."""

    def __init__(self, assoc, folder: Path, limit: int):
        super().__init__(assoc)
        self.folder, self.limit = folder, limit

    def receive_primitive(self, primitive) -> None:
        if self.message is None:
            message = DIMSEMessage()
            message.data_set = InstanceFile(self.folder, self.limit, self, message)
            self.message = message
        super().receive_primitive(primitive)

    def discard(self) -> None:
        """Remove the file of a message that will never be complete (the connection closed)."""
        if self.message is not None and isinstance(self.message.data_set, InstanceFile):
            self.message.data_set.discard()
