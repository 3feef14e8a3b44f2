// The player: hls.js in low-latency mode on /hls/{stream}/index.m3u8, with a quality choice and
// live readouts of latency and stalls. A play token in this page's ?token= rides on the playlist
// URL; the node carries it onto every URI it lists. Safari without MSE plays the URL natively.
"use strict";

(() => {
  const RETRY_MS = 2000; // before asking again for a stream that is not live (yet) or unreachable
  const READOUT_MS = 500;
  // hls.js speeds up to its target latency only from within one target duration of it; a player
  // further behind (a long stall, a slow start, a pause) would stay there. We jump it back to the
  // live edge then, at most once per JUMP_INTERVAL_MS, unless the viewer seeked back on purpose.
  const JUMP_MARGIN_S = 1.0;
  const JUMP_INTERVAL_MS = 10000;

  const $ = (id) => document.getElementById(id);
  const video = $("video");
  const quality = $("quality");
  const stateOut = $("state");

  const stream = decodeURIComponent(location.pathname.replace(/^\/watch\//, ""));
  const token = new URLSearchParams(location.search).get("token");
  const source = "/hls/" + encodeURIComponent(stream) + "/index.m3u8" +
    (token ? "?token=" + encodeURIComponent(token) : "");

  // Read by people through the outputs, and by tests and benchmarks through window.livedgeWatch.
  const stats = {
    started: false, // the video has played at least once: later "waiting" events are stalls
    stalls: 0,
    stalledSeconds: 0,
    hlsStalls: 0, // BUFFER_STALLED_ERROR reports from hls.js
    latency: null, // seconds behind the live edge (hls.latency)
    targetLatency: null,
    clockDelay: null, // seconds between now and the playhead's EXT-X-PROGRAM-DATE-TIME
    jumps: 0, // times the player was put back at the live edge (see JUMP_MARGIN_S)
  };
  let hls = null;
  let stallStartedAt = null;
  let retryTimer = null;
  let seekedBack = false; // the viewer chose to watch behind the live edge
  let lastPosition = 0;
  let lastJumpAt = -Infinity;
  window.livedgeWatch = { stats, source, get hls() { return hls; } };

  document.title = stream + " · livedge";
  $("title").textContent = stream;

  function setState(text, kind) {
    stateOut.textContent = text;
    stateOut.dataset.state = kind;
  }

  function seconds(value) {
    return value === null || !Number.isFinite(value) ? "–" : value.toFixed(2) + " s";
  }

  // -- stalls ------------------------------------------------------------------------------------
  video.addEventListener("waiting", () => {
    if (!stats.started || stallStartedAt !== null) return;
    stats.stalls += 1;
    stallStartedAt = performance.now();
    setState("stalled, buffering", "stalled");
  });
  video.addEventListener("playing", () => {
    stats.started = true;
    if (stallStartedAt !== null) {
      stats.stalledSeconds += (performance.now() - stallStartedAt) / 1000;
      stallStartedAt = null;
    }
    setState("playing", "playing");
  });
  video.addEventListener("pause", () => setState("paused", "paused"));
  video.addEventListener("timeupdate", () => { lastPosition = video.currentTime; });
  video.addEventListener("seeking", () => {
    // Forward seeks are the player's own (gap skips, live sync); backward ones are the viewer's.
    if (video.currentTime < lastPosition - 0.5) seekedBack = true;
  });

  // -- qualities ---------------------------------------------------------------------------------
  function levelLabel(level) {
    const height = level.height ? level.height + "p" : "audio";
    return height + " · " + Math.round(level.bitrate / 1000) + " kb/s";
  }

  function fillQualities() {
    const chosen = hls.autoLevelEnabled ? -1 : hls.currentLevel;
    quality.replaceChildren(new Option("Auto", "-1"));
    hls.levels
      .map((level, index) => ({ level, index }))
      .sort((a, b) => (b.level.height || 0) - (a.level.height || 0) || b.level.bitrate - a.level.bitrate)
      .forEach(({ level, index }) => quality.add(new Option(levelLabel(level), String(index))));
    quality.value = String(chosen);
    quality.disabled = hls.levels.length < 2;
  }

  function showLevel() {
    const level = hls.levels[hls.currentLevel];
    if (!level) return;
    $("level").textContent = levelLabel(level) + (hls.autoLevelEnabled ? " (auto)" : "");
    $("level").dataset.level = String(hls.currentLevel);
  }

  quality.addEventListener("change", () => {
    // currentLevel switches now (flushing what is buffered); -1 gives the choice back to ABR.
    hls.currentLevel = Number(quality.value);
  });

  function goLive() {
    if (!hls || !Number.isFinite(hls.liveSyncPosition)) return;
    // Where the playhead is now, before any timeupdate says so: a viewer seeking back right after
    // this jump is seen going back from here, not from where the player was before it.
    lastPosition = hls.liveSyncPosition;
    video.currentTime = hls.liveSyncPosition;
  }

  $("live").addEventListener("click", () => {
    seekedBack = false;
    goLive();
    video.play().catch(() => {});
  });

  function keepNearLive() {
    if (!hls || seekedBack || video.paused || stats.latency === null || !stats.targetLatency) return;
    const details = hls.levels[hls.currentLevel] && hls.levels[hls.currentLevel].details;
    const targetDuration = details ? details.targetduration : 2;
    const now = performance.now();
    if (stats.latency > stats.targetLatency + targetDuration + JUMP_MARGIN_S &&
        now - lastJumpAt > JUMP_INTERVAL_MS) {
      lastJumpAt = now;
      stats.jumps += 1;
      goLive();
    }
  }

  // -- loading -----------------------------------------------------------------------------------
  function retryLater(text) {
    setState(text, "waiting");
    if (hls) hls.destroy();
    hls = null;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(startHlsJs, RETRY_MS);
  }

  function onError(data) {
    if (data.details === Hls.ErrorDetails.BUFFER_STALLED_ERROR) stats.hlsStalls += 1;
    if (!data.fatal) return;
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
      hls.recoverMediaError();
      return;
    }
    const status = data.response && data.response.code;
    if (status === 401) {
      setState("this stream needs a play token: add ?token=… to this page's address", "error");
      hls.destroy();
    } else if (status === 403) {
      setState("this token may not play this stream", "error");
      hls.destroy();
    } else if (status === 404 || status === 503) {
      retryLater("not live yet; trying again");
    } else {
      retryLater("network error; trying again");
    }
  }

  function startHlsJs() {
    hls = new Hls({
      lowLatencyMode: true,
      backBufferLength: 30, // seconds kept behind the playhead: live viewers rarely seek back
      // Play up to 1.5x when behind the target latency (after a stall, or a late start), so the
      // player returns to the live edge instead of staying as far behind as it fell.
      maxLiveSyncPlaybackRate: 1.5,
    });
    hls.on(Hls.Events.MANIFEST_PARSED, () => {
      fillQualities();
      setState("starting", "starting");
      video.play().catch(() => setState("press play", "paused"));
    });
    hls.on(Hls.Events.LEVEL_SWITCHED, showLevel);
    hls.on(Hls.Events.ERROR, (event, data) => onError(data));
    hls.loadSource(source);
    hls.attachMedia(video);
  }

  function readouts() {
    if (hls) {
      stats.latency = hls.latency > 0 ? hls.latency : null;
      stats.targetLatency = hls.targetLatency;
      const date = hls.playingDate;
      stats.clockDelay = date ? (Date.now() - date.getTime()) / 1000 : null;
      showLevel();
      keepNearLive();
    }
    const latency = $("latency");
    latency.textContent = seconds(stats.latency) +
      (stats.targetLatency ? " (target " + seconds(stats.targetLatency) + ")" : "");
    latency.dataset.value = stats.latency === null ? "" : String(stats.latency);
    $("clock-delay").textContent = seconds(stats.clockDelay);
    let ahead = null;
    for (let i = 0; i < video.buffered.length; i++) {
      if (video.buffered.start(i) <= video.currentTime && video.currentTime <= video.buffered.end(i)) {
        ahead = video.buffered.end(i) - video.currentTime;
      }
    }
    $("buffer").textContent = seconds(ahead);
    const stalled = stats.stalledSeconds +
      (stallStartedAt === null ? 0 : (performance.now() - stallStartedAt) / 1000);
    $("stalls").textContent = stats.stalls + (stats.stalls ? " (" + stalled.toFixed(1) + " s)" : "");
  }

  if (window.Hls && Hls.isSupported()) {
    startHlsJs();
    setInterval(readouts, READOUT_MS);
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = source; // Safari's own player does LL-HLS; no quality choice or readouts there
    setState("playing with the browser's own HLS player", "native");
  } else {
    setState("this browser cannot play HLS (no Media Source Extensions)", "error");
  }
})();
