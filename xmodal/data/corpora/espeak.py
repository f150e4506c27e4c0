"""A ctypes binding to libespeak-ng: whole-sentence synthesis with sample-exact phoneme and word events.

The engine runs synchronously (``AUDIO_OUTPUT_SYNCHRONOUS``) with phoneme events on. Its synthesis callback
receives the PCM in chunks (int16, mono, 22050 Hz for every voice) together with events whose ``sample`` field is
the absolute index of the event in the utterance's PCM, so phoneme boundaries come from the engine itself, to the
sample: nothing is guessed, and the sentence is synthesised in one call (word-by-word synthesis changes prosody).

Rules the engine imposes (see ``METHODS.md``):

* one engine per process, initialised once (:func:`engine`); threads in one process crash it, separate processes
  (``multiprocessing``, DataLoader workers) are fine;
* the ctypes callback object is kept alive for the life of the engine, and each ``wav`` chunk is copied inside
  the callback (the engine reuses the buffer);
* ``espeak_Terminate`` is never called (a second call deadlocks; the process exit releases everything);
* rates of 450 words/min and more break the events, so they are refused; mbrola voices are refused too (a failed
  mbrola voice leaves the engine broken).

Determinism: the engine keeps state from one sentence to the next (pitch flutter phase, glottal phase, gain
control, echo buffer), so the same sentence synthesised twice in one process differs by a few samples in length
and in every sample value. :meth:`Engine.synthesize` therefore synthesises in a forked child of the process
(``fresh=True``, the default): the child starts from the engine as initialised (voice ``en-us`` selected, nothing
synthesised yet), reseeds libc's ``rand()`` (the noise source of fricatives) and sends the result back through a
pipe, so the same text, settings and seed give the same PCM and events, whatever was synthesised before and in
whichever process. ``fresh=False`` synthesises in process, faster, at the price of reproducibility (and then later
fresh syntheses in that process are no longer reproducible either).

Forking a process that has imported torch costs ~15-20 ms here, so the module-level :func:`synthesize` sends each
sentence to a small server process instead (this file run as a script: numpy and ctypes only, one per calling
process, started on first use, ending when its caller's pipe closes), where a fork costs ~2 ms. The calling
process never loads libespeak-ng at all.

The engine may emit a short tail (its echo) after the END event; the PCM is cut at END's sample, so a synthesis
always ends exactly where the engine says the utterance ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

SAMPLE_RATE = 22050
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x1
CHARS_UTF8 = 0x1
PHONEMES = 0x100  # text inside [[ ]] is read as phoneme codes
POS_CHARACTER = 1
EVENT_LIST_TERMINATED, EVENT_WORD, EVENT_SENTENCE, EVENT_END, EVENT_PHONEME = 0, 1, 2, 5, 7
PARAMETERS = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
MAX_RATE = 449
PAUSES = frozenset({"_", "_:", "_!", "_^", "_;", ";"})
LIBRARY_NAMES = ("espeak-ng", "libespeak-ng.so.1")


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class EspeakEvent(ctypes.Structure):
    """``espeak_EVENT`` (40 bytes on x86_64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                 ctypes.POINTER(EspeakEvent))


@dataclass(frozen=True)
class VoiceSettings:
    """What the engine is told before a sentence.

    Attributes:
        voice: voice name with an optional variant, e.g. ``en-us+m3`` (not ``en-gb``: use ``en``).
        rate: words per minute (80-449). pitch, range: 0-100. wordgap: extra pause between words, units of 10 ms.
        volume: amplitude, 0-200 (100 is the engine's default).
    """

    voice: str = "en-us"
    rate: int = 150
    pitch: int = 50
    range: int = 50
    wordgap: int = 0
    volume: int = 100


@dataclass
class Synthesis:
    """One synthesised sentence.

    Attributes:
        pcm: int16 ``S`` at :data:`SAMPLE_RATE`, cut at the END event.
        phonemes: ``(mnemonic, start, end)`` in samples, contiguous, ``end`` of the last equal to ``len(pcm)``.
        words: ``(text_position, length, start_sample)`` of each word event (``text_position`` is 1-based).
        end_sample: the END event's sample. tail: samples the engine emitted after END (cut off).
    """

    pcm: np.ndarray
    phonemes: list[tuple[str, int, int]]
    words: list[tuple[int, int, int]]
    end_sample: int
    tail: int = 0
    sample_rate: int = SAMPLE_RATE


def find_library() -> str | None:
    """The path or soname of libespeak-ng (``XMODAL_ESPEAK_LIB`` overrides), or ``None`` when it is missing."""
    override = os.environ.get("XMODAL_ESPEAK_LIB")
    if override:
        return override
    for name in LIBRARY_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    try:
        ctypes.CDLL(LIBRARY_NAMES[-1])
    except OSError:
        return None
    return LIBRARY_NAMES[-1]


def available() -> bool:
    """Whether libespeak-ng can be loaded here."""
    path = find_library()
    if path is None:
        return False
    try:
        ctypes.CDLL(path)
    except OSError:
        return False
    return True


def check_settings(settings: VoiceSettings) -> None:
    """Refuse what breaks the engine: mbrola voices, and rates at which its events break.

    Raises:
        ValueError: for such settings.
    """
    if "mb-" in settings.voice or "mbrola" in settings.voice:
        raise ValueError(f"mbrola voices break the engine: {settings.voice!r}")
    if not 80 <= settings.rate <= MAX_RATE:
        raise ValueError(f"rate must be in 80..{MAX_RATE}, got {settings.rate}")


class Engine:
    """The process's espeak-ng engine; get it through :func:`engine`, never construct two."""

    def __init__(self, library: str | None = None) -> None:
        path = library or find_library()
        if path is None:
            raise OSError("libespeak-ng not found (Debian: apt-get install libespeak-ng1 espeak-ng-data)")
        self._lib = ctypes.CDLL(path)
        self._libc = ctypes.CDLL(None)
        self._declare()
        rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, INITIALIZE_PHONEME_EVENTS)
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected sample rate {SAMPLE_RATE}")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = SynthCallback(self._on_audio)  # kept alive for as long as the engine
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        self.set_voice(VoiceSettings())  # loads the English dictionary once, before any fork

    def _declare(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        self._libc.srand.argtypes = [ctypes.c_uint]
        self._libc.srand.restype = None

    def _on_audio(self, wav: ctypes._Pointer, num_samples: int, events: ctypes._Pointer) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        index = 0
        while events[index].type != EVENT_LIST_TERMINATED:
            event = events[index]
            name = event.id.string.decode("ascii", "replace") if event.type == EVENT_PHONEME else ""
            self._events.append((event.type, event.sample, event.text_position, event.length, name))
            index += 1
        return 0

    def set_voice(self, settings: VoiceSettings) -> None:
        """Select the voice (only when it changes) and set every parameter.

        Raises:
            ValueError: for mbrola voices, rates the events do not survive, or a voice the engine refuses.
        """
        check_settings(settings)
        if settings.voice != self._voice:
            if self._lib.espeak_SetVoiceByName(settings.voice.encode()) != 0:
                self._voice = None
                raise ValueError(f"espeak-ng has no voice {settings.voice!r}")
            self._voice = settings.voice
        for name, param in PARAMETERS.items():
            self._lib.espeak_SetParameter(param, int(getattr(settings, name)), 0)

    def synthesize(self, text: str, settings: VoiceSettings, seed: int = 0, fresh: bool = True) -> Synthesis:
        """Synthesise ``text`` (one sentence; ``[[...]]`` holds phoneme codes) in one engine call.

        Args:
            text: the sentence. settings: voice and parameters. seed: seed of the engine's noise source.
            fresh: synthesise in a forked child from the engine's initial state (reproducible; see the module
                docstring); ``False`` synthesises in this process.

        Returns:
            The PCM with its phoneme and word events.
        """
        check_settings(settings)
        if not fresh:
            return self._synthesize(text, settings, seed)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: synthesise, send, exit without running any Python exit handler
            os.close(read_fd)
            try:
                payload = pickle.dumps(self._synthesize(text, settings, seed))
            except BaseException as error:  # noqa: BLE001 - any failure goes back to the parent
                payload = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(payload)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not payload:
            raise RuntimeError(f"espeak-ng child died (wait status {status}) on {text!r}")
        result = pickle.loads(payload)
        if isinstance(result, BaseException):
            raise result
        return result

    def _synthesize(self, text: str, settings: VoiceSettings, seed: int) -> Synthesis:
        self._voice = None  # always reselect: the same calls from the same state give the same samples
        self.set_voice(settings)
        self._chunks, self._events = [], []
        self._libc.srand(seed)
        data = text.encode("utf-8") + b"\0"
        error = self._lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8 | PHONEMES, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed with error {error} on {text!r}")
        self._lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        phonemes, words, end = _parse_events(self._events, len(pcm))
        return Synthesis(pcm[:end].astype(np.int16), phonemes, words, end, len(pcm) - end)


def _parse_events(
    events: list[tuple[int, int, int, int, str]], num_samples: int
) -> tuple[list[tuple[str, int, int]], list[tuple[int, int, int]], int]:
    """Phoneme spans (each ends where the next starts; the last at END), word events and END's sample."""
    ends = [sample for kind, sample, *_ in events if kind == EVENT_END]
    end = ends[-1] if ends else num_samples
    if end > num_samples:
        raise RuntimeError(f"END event at sample {end} but the PCM has only {num_samples} samples")
    starts = [(name, sample) for kind, sample, _, _, name in events if kind == EVENT_PHONEME]
    phonemes = [(name, start, starts[i + 1][1] if i + 1 < len(starts) else end) for i, (name, start) in
                enumerate(starts)]
    words = [(position, length, sample) for kind, sample, position, length, _ in events if kind == EVENT_WORD]
    return phonemes, words, end


_ENGINE: Engine | None = None


def engine() -> Engine:
    """The process's engine, initialised on first use (a forked child inherits its parent's; that is safe)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Engine()
    return _ENGINE


def synthesize(text: str, settings: VoiceSettings | None = None, seed: int = 0, fresh: bool = True) -> Synthesis:
    """Synthesise ``text`` (see :meth:`Engine.synthesize`): fresh, through this process's synthesis server; not
    fresh, in this process.

    Raises:
        ValueError: for settings the engine cannot take. RuntimeError: when the synthesis fails.
    """
    settings = settings or VoiceSettings()
    check_settings(settings)
    if not fresh:
        return engine().synthesize(text, settings, seed, fresh=False)
    server = _server()
    assert server.stdin is not None and server.stdout is not None
    _send(server.stdin, (text, asdict(settings), seed))
    reply = _receive(server.stdout)
    if reply is None:
        raise RuntimeError(f"the espeak-ng server died (exit status {server.poll()})")
    if isinstance(reply, str):
        raise RuntimeError(reply)
    pcm, phonemes, words, end, tail = reply
    return Synthesis(np.frombuffer(pcm, np.int16).copy(), phonemes, words, end, tail)


_SERVER: tuple[int, subprocess.Popen] | None = None


def _server() -> subprocess.Popen:
    """This process's synthesis server (a forked process gets its own)."""
    global _SERVER
    if _SERVER is None or _SERVER[0] != os.getpid() or _SERVER[1].poll() is not None:
        command = [sys.executable, os.path.abspath(__file__), "--serve"]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _SERVER = (os.getpid(), process)
    return _SERVER[1]


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next message, or ``None`` at the end of the stream."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    return pickle.loads(stream.read(struct.unpack("<Q", head)[0]))


def _serve() -> None:
    """The server loop: ``(text, settings, seed)`` in, ``(pcm bytes, phonemes, words, end, tail)`` or an error out."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    server_engine = Engine()
    while (request := _receive(stdin)) is not None:
        text, fields, seed = request
        try:
            result = server_engine.synthesize(text, VoiceSettings(**fields), seed)
            reply: Any = (result.pcm.tobytes(), result.phonemes, result.words, result.end_sample, result.tail)
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
            reply = f"{type(error).__name__}: {error}"
        _send(stdout, reply)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
