// The publisher: capture a camera and microphone or a screen, preview it, and send it to the node.
// WHIP (WebRTC): one POST of an SDP offer with every ICE candidate in it (the node does no trickle
// ICE), the answer back with a Location to DELETE when done. WebSocket fallback, for networks that
// block UDP: MediaRecorder WebM in short chunks to ws://host:WS_PORT/ingest/{stream}?token=...
"use strict";

(() => {
  const ICE_GATHERING_TIMEOUT_MS = 3000; // then offer the candidates gathered so far
  const RECORDER_TIMESLICE_MS = 200; // chunk length: short chunks keep WebSocket latency low
  const WEBSOCKET_BACKLOG_BYTES = 4 * 1024 * 1024; // unsent bytes that mean the link is too slow
  const VIDEO_MAX_BITRATE = 2500000; // bits per second, both transports
  const AUDIO_BITRATE = 128000;
  const STATS_MS = 1000;
  const DELETE_TIMEOUT_MS = 3000; // a node that does not answer must not keep the page busy
  const CLOSE_TIMEOUT_MS = 3000; // the same for the WebSocket's closing handshake
  const RECORDER_TYPES = ["video/webm;codecs=vp8,opus", "video/webm;codecs=vp9,opus",
    "video/webm;codecs=h264,opus", "video/webm"];

  const $ = (id) => document.getElementById(id);
  const form = $("publish");
  const preview = $("preview");
  const sourceSelect = $("source");
  const cameraSelect = $("camera");
  const microphoneSelect = $("microphone");
  const websocketBox = $("websocket");
  const startButton = $("start");
  const stopButton = $("stop");
  const stateOut = $("state");
  const bitrateOut = $("bitrate");
  const transportOut = $("transport");
  const watchLink = $("watch-link");

  let config = { ws_port: null, playback_auth: false };
  let session = null; // the publication in progress, if any (see start())
  window.livedgePublish = { get session() { return session; } };

  function setState(text, kind) {
    stateOut.textContent = text;
    stateOut.dataset.state = kind;
  }

  function setBusy(busy) {
    startButton.disabled = busy;
    stopButton.disabled = !busy;
    for (const control of [sourceSelect, cameraSelect, microphoneSelect, $("stream"), $("token")]) {
      control.disabled = busy;
    }
    websocketBox.disabled = busy || !config.ws_port;
  }

  // -- devices -----------------------------------------------------------------------------------
  function fillDevices(select, devices, defaultLabel, noun) {
    const chosen = select.value;
    const keep = [...select.options].filter((option) => option.value === "none");
    select.replaceChildren(new Option(defaultLabel, ""), ...keep);
    devices.forEach((device, index) => {
      select.add(new Option(device.label || noun + " " + (index + 1), device.deviceId));
    });
    if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
  }

  async function listDevices() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
    const devices = await navigator.mediaDevices.enumerateDevices();
    fillDevices(cameraSelect, devices.filter((d) => d.kind === "videoinput" && d.deviceId),
      "Default camera", "Camera");
    fillDevices(microphoneSelect, devices.filter((d) => d.kind === "audioinput" && d.deviceId),
      "Default microphone", "Microphone");
  }

  sourceSelect.addEventListener("change", () => {
    $("camera-field").hidden = sourceSelect.value !== "camera";
  });

  async function capture() {
    const mic = microphoneSelect.value;
    const audio = mic === "none" ? false : mic ? { deviceId: { exact: mic } } : true;
    if (sourceSelect.value === "screen") {
      const screen = await navigator.mediaDevices.getDisplayMedia({
        video: { frameRate: { ideal: 30 } }, audio: false });
      if (audio) {
        try {
          const voice = await navigator.mediaDevices.getUserMedia({ audio });
          voice.getAudioTracks().forEach((track) => screen.addTrack(track));
        } catch (error) {
          screen.getTracks().forEach((track) => track.stop());
          throw error;
        }
      }
      return screen;
    }
    const video = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
    if (cameraSelect.value) video.deviceId = { exact: cameraSelect.value };
    return navigator.mediaDevices.getUserMedia({ video, audio });
  }

  // -- errors ------------------------------------------------------------------------------------
  async function responseProblem(response) {
    let message = response.statusText;
    try {
      message = (await response.json()).message || message;
    } catch (ignored) { /* not JSON: keep the status text */ }
    return response.status + " " + message;
  }

  function describeError(error) {
    if (error && error.name === "NotAllowedError") return "permission to capture was refused";
    if (error && error.name === "NotFoundError") return "no such camera or microphone";
    return (error && error.message) || String(error);
  }

  // -- WHIP --------------------------------------------------------------------------------------
  function iceGatheringComplete(pc) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") {
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  async function startWhip(s) {
    const pc = new RTCPeerConnection();
    s.pc = pc;
    for (const track of s.media.getTracks()) {
      const init = { direction: "sendonly", streams: [s.media] };
      if (track.kind === "video") init.sendEncodings = [{ maxBitrate: VIDEO_MAX_BITRATE }];
      pc.addTransceiver(track, init);
    }
    pc.addEventListener("connectionstatechange", () => {
      if (s !== session) return;
      if (pc.connectionState === "connected") setState("live", "live");
      else if (pc.connectionState === "disconnected") setState("connection interrupted", "connecting");
      else if (pc.connectionState === "failed") {
        stop(s, "the WebRTC connection failed; if UDP is blocked here, use the WebSocket option",
          "error");
      }
    });
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    const response = await fetch("/whip/" + encodeURIComponent(s.name), {
      method: "POST",
      headers: { "Content-Type": "application/sdp", "Authorization": "Bearer " + s.token },
      body: pc.localDescription.sdp,
    });
    if (response.status !== 201) throw new Error("the node refused: " + await responseProblem(response));
    const resource = response.headers.get("Location");
    if (resource) s.resource = new URL(resource, response.url).href;
    const answer = await response.text();
    if (s.stopping) { // stopped while the POST was out: the session exists now, so end it
      deleteResource(s);
      return;
    }
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    transportOut.textContent = "WebRTC (WHIP)";
  }

  function deleteResource(s, keepalive = false) {
    if (!s.resource) return Promise.resolve();
    const resource = s.resource;
    s.resource = null;
    return fetch(resource, { method: "DELETE", keepalive, signal: AbortSignal.timeout(DELETE_TIMEOUT_MS),
      headers: { "Authorization": "Bearer " + s.token } }).catch(() => {});
  }

  // -- WebSocket ---------------------------------------------------------------------------------
  function startWebSocket(s) {
    const wanted = s.media.getAudioTracks().length ? RECORDER_TYPES
      : RECORDER_TYPES.map((type) => type.replace(/,opus$/, ""));
    const mimeType = wanted.find((type) => MediaRecorder.isTypeSupported(type));
    if (!mimeType) throw new Error("this browser cannot record WebM");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.hostname + ":" +
      config.ws_port + "/ingest/" + encodeURIComponent(s.name) + "?token=" +
      encodeURIComponent(s.token);
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      s.ws = ws;
      let opened = false;
      ws.addEventListener("open", () => {
        opened = true;
        const recorder = new MediaRecorder(s.media, { mimeType,
          videoBitsPerSecond: VIDEO_MAX_BITRATE, audioBitsPerSecond: AUDIO_BITRATE });
        s.recorder = recorder;
        recorder.addEventListener("dataavailable", (event) => {
          if (event.data.size && ws.readyState === WebSocket.OPEN) {
            ws.send(event.data);
            s.bytesSent += event.data.size;
          }
        });
        // The last chunk comes before "stop": close after it, so the node gets every byte.
        recorder.addEventListener("stop", () => ws.close(1000, "publisher stopped"));
        recorder.start(RECORDER_TIMESLICE_MS);
        transportOut.textContent = "WebSocket · " + mimeType;
        setState("live", "live");
        resolve();
      });
      ws.addEventListener("close", (event) => {
        if (!opened) {
          // Browsers hide the status of a refused handshake (401, 403, 404...): say what it may be.
          reject(new Error("the node refused the WebSocket or cannot be reached: check the " +
            "stream name and token, and that WebSocket ingest is on port " + config.ws_port));
        } else if (s === session && !s.stopping) {
          stop(s, "the node closed the connection: " + (event.reason || "code " + event.code),
            "error");
        }
      });
    });
  }

  // -- readouts ----------------------------------------------------------------------------------
  async function sampleBitrate(s) {
    let bytes = s.bytesSent;
    if (s.pc) {
      bytes = 0;
      const report = await s.pc.getStats();
      report.forEach((entry) => {
        if (entry.type === "outbound-rtp") bytes += entry.bytesSent || 0;
        if (entry.type === "outbound-rtp" && entry.kind === "video" && entry.frameWidth) {
          const codec = report.get(entry.codecId);
          transportOut.textContent = "WebRTC (WHIP) · " + (codec ? codec.mimeType + " " : "") +
            entry.frameWidth + "×" + entry.frameHeight + " " + Math.round(entry.framesPerSecond || 0) +
            " fps";
        }
      });
    }
    const now = performance.now();
    if (s.lastSample && s === session) {
      const bps = (bytes - s.lastSample.bytes) * 8 / ((now - s.lastSample.at) / 1000);
      bitrateOut.textContent = (bps / 1e6).toFixed(2) + " Mb/s";
      bitrateOut.dataset.bps = String(Math.round(bps));
    }
    s.lastSample = { bytes, at: now };
    if (s.ws && s.ws.bufferedAmount > WEBSOCKET_BACKLOG_BYTES && s === session) {
      setState("live, but the network is slower than the stream: falling behind", "live");
    }
  }

  // -- start and stop ----------------------------------------------------------------------------
  async function start() {
    if (session) return;
    const s = { name: $("stream").value.trim(), token: $("token").value.trim(),
      kind: websocketBox.checked ? "websocket" : "whip", bytesSent: 0, stopping: false,
      media: null, pc: null, ws: null, recorder: null, resource: null, timer: null };
    session = s;
    setBusy(true);
    try {
      setState("asking for the " + (sourceSelect.value === "screen" ? "screen" : "camera"), "capturing");
      s.media = await capture();
      if (s.stopping) { // Stop was pressed while the browser asked for permission
        s.media.getTracks().forEach((track) => track.stop());
        return;
      }
      preview.srcObject = s.media;
      listDevices().catch(() => {}); // device names are readable once capture is allowed
      s.media.getVideoTracks().forEach((track) => track.addEventListener("ended", () => {
        if (s === session) stop(s, "the capture ended (the screen share was stopped?)", "stopped");
      }));
      setState("connecting", "connecting");
      if (s.kind === "websocket") await startWebSocket(s);
      else await startWhip(s);
      if (s !== session) return;
      watchLink.href = "/watch/" + encodeURIComponent(s.name);
      watchLink.textContent = location.origin + watchLink.getAttribute("href");
      watchLink.hidden = false;
      s.timer = setInterval(() => sampleBitrate(s).catch(() => {}), STATS_MS);
    } catch (error) {
      if (s === session) stop(s, describeError(error), "error");
    }
  }

  async function stop(s, text = "stopped", kind = "stopped") {
    if (!s || s.stopping) return;
    s.stopping = true;
    if (session === s) session = null;
    clearInterval(s.timer);
    if (s.recorder && s.recorder.state !== "inactive") s.recorder.stop();
    else if (s.ws) s.ws.close(1000, "publisher stopped");
    if (s.media) s.media.getTracks().forEach((track) => track.stop());
    preview.srcObject = null;
    bitrateOut.textContent = "–";
    delete bitrateOut.dataset.bps;
    setState("stopping", "stopping");
    // DELETE before closing the peer connection: a closed connection may end the session on
    // the node first, and the DELETE would then find nothing (404). Start is offered again only
    // once the node has let go, so publishing the same name again is not refused as a duplicate.
    await deleteResource(s);
    if (s.pc) s.pc.close();
    if (s.ws) await closed(s.ws);
    setBusy(false);
    setState(text, kind);
  }

  function closed(ws) {
    return new Promise((resolve) => {
      if (ws.readyState === WebSocket.CLOSED) return resolve();
      const timer = setTimeout(resolve, CLOSE_TIMEOUT_MS);
      ws.addEventListener("close", () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    start();
  });
  stopButton.addEventListener("click", () => stop(session));
  // Leaving the page ends the publication now instead of when the node notices the silence.
  window.addEventListener("pagehide", () => {
    if (session) deleteResource(session, true);
  });

  fetch("/api/config").then((response) => response.json()).then((loaded) => {
    config = loaded;
    if (!config.ws_port) {
      websocketBox.checked = false;
      websocketBox.title = "this node does not say which port WebSocket ingest listens on";
    }
    setBusy(session !== null);
  }).catch(() => setBusy(session !== null));
  listDevices().catch(() => {});
})();
