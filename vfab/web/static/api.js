// The HTTP API (contract section 3) and the API key the dashboard keeps.
//
// The key lives in localStorage so that the operator types it once per
// browser. A key given in the page's own URL (/?api_key=KEY, the way in when
// the daemon asks for a key even for the dashboard's files) wins and is kept.

const KEY_STORAGE = "vfab.api_key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor() {
    const fromUrl = new URLSearchParams(location.search).get("api_key");
    if (fromUrl) {
      this.setKey(fromUrl);
    }
    this.onUnauthorized = () => {};
  }

  get key() {
    return localStorage.getItem(KEY_STORAGE) || "";
  }

  setKey(key) {
    if (key) {
      localStorage.setItem(KEY_STORAGE, key);
    } else {
      localStorage.removeItem(KEY_STORAGE);
    }
  }

  // One call; resolves with the decoded JSON (null for an empty answer),
  // rejects with an ApiError that carries the daemon's own error message.
  async request(method, path, { body, contentType } = {}) {
    const headers = { Accept: "application/json" };
    if (this.key) {
      headers["X-API-Key"] = this.key;
    }
    if (contentType) {
      headers["Content-Type"] = contentType;
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body });
    } catch (error) {
      throw new ApiError(0, "unreachable", "the daemon cannot be reached");
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (error) {
        data = null;
      }
    }
    if (!response.ok) {
      const detail = data && data.error ? data.error : {};
      const error = new ApiError(response.status, detail.code || "http_error",
        detail.message || `${response.status} ${response.statusText}`);
      if (response.status === 401) {
        this.onUnauthorized(error);
      }
      throw error;
    }
    return data;
  }

  submit(file) {
    const name = fileStem(file.name);
    return this.request("POST", `/api/jobs?name=${encodeURIComponent(name)}`,
      { body: file, contentType: "image/svg+xml" });
  }

  jobAction(jobId, action) {
    return this.request("POST", `/api/jobs/${encodeURIComponent(jobId)}/${action}`);
  }

  preview(jobId) {
    return this.request("GET", `/api/jobs/${encodeURIComponent(jobId)}/preview`);
  }
}

// "cat drawing.final.svg" -> "cat drawing.final": the job's name is the file's.
export function fileStem(filename) {
  const base = filename.split(/[\\/]/).pop() || "";
  const dot = base.lastIndexOf(".");
  return (dot > 0 ? base.slice(0, dot) : base) || "untitled";
}
