-- Argo CD health of a Baton Rollout (group baton.dev, kind Rollout), from the
-- status the operator writes (deploy/crds/rollouts.baton.dev.yaml):
--
--   no status, or status.observedGeneration behind metadata.generation
--                                  -> Progressing: the operator has not seen this spec yet
--   an InvalidSpec condition for this generation
--                                  -> Degraded: nothing runs until the spec is fixed
--   phase Healthy                  -> Healthy
--   phase Progressing              -> Progressing
--   phase Paused                   -> Suspended (a pause step, a blue-green waiting for
--                                     promote, a person's pause, or a failed gate with
--                                     rollback.onFailure: false)
--   phase Degraded                 -> Degraded (aborted by a person, a gate, smoke tests
--                                     or the progress deadline; all traffic is on stable)
--   any other phase                -> Progressing, waiting for the operator
--
-- Argo CD runs this with gopher-lua (Lua 5.1): `obj` is the live object, and the
-- script returns `hs` with `status` and `message`. It uses only the base functions,
-- which Argo CD opens without `useOpenLibs` (no string or math library). Tested by
-- ./test with lua5.1.
local hs = {}
local waiting = "Waiting for the operator to observe the Rollout"

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = waiting
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration or 0
if generation ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = waiting .. " (generation " .. tostring(generation) .. ", status of " .. tostring(observed) .. ")"
  return hs
end

local message = obj.status.message or ""

-- The operator keeps the phase it had when the spec turned invalid: the condition says
-- the current spec runs nothing.
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "InvalidSpec" and c.status == "True"
        and (generation == nil or c.observedGeneration == nil or c.observedGeneration == generation) then
      hs.status = "Degraded"
      if message ~= "" then
        hs.message = message
      else
        hs.message = "invalid spec: " .. (c.message or "")
      end
      return hs
    end
  end
end

local phase = obj.status.phase or ""
if phase == "Healthy" then
  hs.status = "Healthy"
elseif phase == "Progressing" then
  hs.status = "Progressing"
elseif phase == "Paused" then
  hs.status = "Suspended"
elseif phase == "Degraded" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
  if phase == "" then
    hs.message = waiting
  else
    hs.message = waiting .. " (unknown phase " .. phase .. ")"
  end
  return hs
end
hs.message = message
return hs
