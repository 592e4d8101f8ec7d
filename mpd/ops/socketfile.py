"""The control socket's file: where it is, with which mode and group, and which inode is
the one mpd bound. mpd binds it at start (as the start user, before any privilege drop),
tells from one lstat whether the file at the path is still its own, binds a new one when
it is gone (or replaced by a stale socket), and unlinks it at exit, only if it is its
own. A live socket of another process, or a file that is not a socket, is never touched."""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass

UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(Exception):
    """The control socket cannot be set up; the message says why and what to do."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """pid, uid and gid of the peer (for a connecting socket: of the listener's process
    when it called listen())."""
    return UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))


@dataclass
class SocketFile:
    path: str
    mode: int
    group: str  # control.allow_group: the socket's group ("": the process's)
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file mpd bound; None:
    #                                        not known (state from the release before)
    made_directory: str = ""  # the directory bind() created (the privilege drop gives it
    #                            to server.user, so that mpd can recreate its socket there)

    def bind(self) -> socket.socket:
        """A non-blocking listening socket at the path, replacing a stale socket file (a
        crashed run's) but never a live one; its inode is recorded. Raises ControlError."""
        directory = os.path.dirname(self.path)
        if directory and not os.path.isdir(directory):
            try:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            except OSError as e:
                raise ControlError(f"cannot create {directory}: {e.strerror}") from None
            self.made_directory = directory
        remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, self.mode)
            st = os.lstat(self.path)
        except OSError as e:
            sock.close()
            raise ControlError(f"cannot create the control socket {self.path}: "
                               f"{e.strerror}") from None
        if self.group:
            try:
                give_to_group(self.path, self.group)
            except OSError as e:
                sock.close()
                os.unlink(self.path)
                raise ControlError(
                    f"cannot make the control socket {self.path} group-owned by {self.group} "
                    f"(control.allow_group): {e.strerror}; mpd must run as root or as a "
                    f"member of {self.group} (under systemd: Group={self.group}, see README "
                    "\"Access control under systemd\")") from None
        sock.listen(socket.SOMAXCONN)  # a burst of mpdctl calls queues instead of EAGAIN
        sock.setblocking(False)
        self.inode = (st.st_dev, st.st_ino)
        return sock

    def lost(self) -> str | None:
        """None while the file at the path is the socket mpd bound (one lstat); else what
        became of it: "gone" or "replaced". Raises OSError when the path cannot be looked
        at (EACCES: its directory is out of this user's reach)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return "gone"
        if self.inode is None:  # adopted from a master that did not record it: ask
            if not stat.S_ISSOCK(st.st_mode):
                return "replaced"
            pid = listener_pid(self.path)
            if pid is None:
                return None  # cannot tell now (its queue is full): the next look will
            if pid != os.getpid():
                return "replaced"
            self.inode = (st.st_dev, st.st_ino)
        return None if (st.st_dev, st.st_ino) == self.inode else "replaced"

    def unlink(self) -> None:
        """Remove the file if it is still the one mpd bound."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        except (FileNotFoundError, PermissionError):
            pass  # gone, or in a directory that the user mpd dropped to cannot write


def remove_stale(path: str) -> None:
    """Unlink a socket nothing listens on (a crashed run's); refuse a live one, and
    anything that is not a socket. Never waits: the probe does not block."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or set "
                           "control.socket to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its process is gone
        return
    except BlockingIOError:
        pass  # its listen queue is full: someone listens
    except OSError as e:
        raise ControlError(f"cannot check {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"another mpd is running: it answers on {path}")


def listener_pid(path: str) -> int | None:
    """The pid of the process listening on the socket at `path` (SO_PEERCRED gives the
    listener's, as it was at listen()); 0 when nothing listens (a stale socket); None when
    it cannot be told now (its listen queue is full). Never waits."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
        return peer_credentials(probe)[0]
    except BlockingIOError:
        return None
    except OSError:
        return 0
    finally:
        probe.close()


def give_to_group(path: str, group: str) -> None:
    """chown the socket to `group`, unless it has that group already: the socket of a
    process whose group it is (systemd's Group=) needs no chown, which the unit's system
    call filter forbids."""
    gid = grp.getgrnam(group).gr_gid
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)
